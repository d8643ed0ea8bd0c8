"""Pascal-VOC XML box annotations (the BCCD layout: ``Annotations/<stem>.xml`` beside ``JPEGImages/``).

Boxes are clipped to the image; boxes that are empty after clipping (degenerate, or entirely
outside the image) are dropped and counted in :attr:`VocAnnotation.dropped`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feature_cache.errors import UserError


@dataclass(frozen=True)
class VocBox:
    """One labelled box in pixels; ``x1``/``y1`` are exclusive after clipping."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) centre of the box."""
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def contains(self, x: float, y: float) -> bool:
        """Whether the point (x, y) lies inside the box (edges included)."""
        return self.x0 <= x <= self.x1 and self.y0 <= y <= self.y1


@dataclass(frozen=True)
class VocAnnotation:
    """The boxes of one image.

    Attributes:
        filename: image file name written in the XML.
        width: image width in pixels (0 when the XML has no size).
        height: image height in pixels.
        boxes: the kept boxes, in file order.
        dropped: number of degenerate or out-of-image boxes removed.
    """

    filename: str
    width: int
    height: int
    boxes: tuple[VocBox, ...]
    dropped: int = 0

    def of(self, label: str) -> list[VocBox]:
        """Boxes whose label equals ``label`` (case-insensitive)."""
        return [b for b in self.boxes if b.label.lower() == label.lower()]

    def as_array(self, label: str) -> np.ndarray:
        """(k, 4) float64 (x0, y0, x1, y1) boxes of one label."""
        rows = [(b.x0, b.y0, b.x1, b.y1) for b in self.of(label)]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _num(node: ET.Element | None, tag: str, path: Path) -> float:
    child = node.find(tag) if node is not None else None
    if child is None or child.text is None:
        raise UserError(f"{path}: VOC box without <{tag}>")
    try:
        return float(child.text.strip())
    except ValueError as exc:
        raise UserError(f"{path}: VOC <{tag}> is not a number: {child.text.strip()!r}") from exc


def read_voc(path: str | Path, width: int | None = None, height: int | None = None) -> VocAnnotation:
    """Read one Pascal-VOC XML file.

    Args:
        path: the ``.xml`` file.
        width: image width used for clipping; defaults to the XML's ``<size>``.
        height: image height used for clipping.

    Returns:
        The annotation, boxes clipped to ``[0, width] x [0, height]``.

    Raises:
        UserError: the file is missing or not VOC XML.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise UserError(f"{path}: cannot read VOC annotation ({exc})") from exc
    size = root.find("size")
    w = width if width is not None else int(_num(size, "width", path)) if size is not None else 0
    h = height if height is not None else int(_num(size, "height", path)) if size is not None else 0
    boxes: list[VocBox] = []
    dropped = 0
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (_num(bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        if w > 0 and h > 0:
            x0, x1 = float(np.clip(x0, 0, w)), float(np.clip(x1, 0, w))
            y0, y1 = float(np.clip(y0, 0, h)), float(np.clip(y1, 0, h))
        if x1 - x0 < 1 or y1 - y0 < 1:
            dropped += 1
            continue
        boxes.append(VocBox(name, x0, y0, x1, y1))
    return VocAnnotation(root.findtext("filename") or path.stem, int(w), int(h), tuple(boxes), dropped)


def annotation_path(image_path: str | Path) -> Path | None:
    """The VOC XML of an image in the BCCD layout (``../Annotations/<stem>.xml`` or beside it)."""
    image_path = Path(image_path)
    for cand in (
        image_path.parent.parent / "Annotations" / f"{image_path.stem}.xml",
        image_path.with_suffix(".xml"),
    ):
        if cand.is_file():
            return cand
    return None
