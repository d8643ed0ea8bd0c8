"""Smear field images (JPEG/PNG/TIFF fields of view): detected cells cropped around their centres.

One bag per image; the bag id is the file stem. ``path`` is an image file or a folder of images;
a folder in the Pascal-VOC/BCCD layout (``JPEGImages/`` + ``Annotations/``) is read from its
``JPEGImages/``. Cells are found by the detector (:mod:`.detect`) or, with ``boxes="voc"``, taken
from the VOC annotations (centres of the boxes whose label is ``WBC`` or ``RBC``).
Crops are ``crop_size`` pixels square, centred on each cell; parts outside the image are filled
with the field's glass colour.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources.base import BagOrigin, BagSource, Cell, digest, file_stamp
from feature_cache.sources.detect import CELL_KINDS, Detections, DetectorConfig, detect_cells
from feature_cache.sources.image_io import ImageReadError, crop_centered, is_image_file, read_rgb
from feature_cache.sources.registry import register_source
from feature_cache.sources.voc import annotation_path, read_voc

FIELD_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
CROP_FRACTION = {"wbc": 2.4, "rbc": 1.4}  # default crop side, in red-cell diameters


def default_crop_size(cells: str, rbc_diameter_px: float) -> int:
    """Crop side for ``cells`` (``wbc``: 2.4 red-cell diameters, ``rbc``: 1.4), even pixels."""
    return max(8, round(CROP_FRACTION[cells] * rbc_diameter_px / 2) * 2)


def order_raster(det: Detections) -> Detections:
    """Detections sorted top-to-bottom, then left-to-right (a stable, position-only order)."""
    order = np.lexsort((det.centres[:, 0], det.centres[:, 1]))
    return det.select(order)


class FieldSource(BagSource):
    """Cells detected in smear field images.

    Args:
        path: an image file, a folder of images, or a VOC/BCCD folder with ``JPEGImages/``.
        cells: ``"wbc"`` (white cells) or ``"rbc"`` (red cells, for anemia).
        crop_size: crop side in pixels; default from ``cells`` and ``rbc_diameter_px``.
        rbc_diameter_px: red-cell diameter in the images' pixels (≈100 in BCCD fields).
        boxes: ``"detect"`` (the detector) or ``"voc"`` (annotated boxes; images without an XML
            file are recorded as failures).
        detector: detector options overriding the defaults (names of :class:`DetectorConfig`).

    Raises:
        UserError: no image found, or two images share a stem.
        InvalidArgumentError: unknown ``cells``/``boxes`` value or detector option.
    """

    kind = "fields"

    def __init__(
        self,
        path: str | Path,
        cells: str = "wbc",
        crop_size: int | None = None,
        rbc_diameter_px: float = 100.0,
        boxes: str = "detect",
        detector: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if cells not in CELL_KINDS:
            raise InvalidArgumentError(f"cells must be one of {CELL_KINDS}, got {cells!r}")
        if boxes not in ("detect", "voc"):
            raise InvalidArgumentError(f"boxes must be 'detect' or 'voc', got {boxes!r}")
        self.path = Path(path)
        self.cells = cells
        self.boxes = boxes
        self.config = DetectorConfig(rbc_diameter_px=float(rbc_diameter_px)).replace(**(detector or {}))
        self.crop_size = int(crop_size) if crop_size else default_crop_size(cells, self.config.rbc_diameter_px)
        if self.crop_size < 4:
            raise InvalidArgumentError(f"crop_size must be >= 4 pixels, got {self.crop_size}")
        self._images = self._find_images(self.path)

    @staticmethod
    def _find_images(path: Path) -> dict[str, Path]:
        if path.is_file():
            if not is_image_file(path, FIELD_SUFFIXES):
                raise UserError(f"{path}: not a field image ({'/'.join(FIELD_SUFFIXES)})")
            return {path.stem: path}
        if not path.is_dir():
            raise UserError(f"{path}: field image or folder not found")
        folder = path / "JPEGImages" if (path / "JPEGImages").is_dir() else path
        images: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if not is_image_file(p, FIELD_SUFFIXES):
                continue
            if p.stem in images:
                raise UserError(f"{p}: same bag id (file stem) as {images[p.stem].name}; rename one")
            images[p.stem] = p
        if not images:
            raise UserError(f"{folder}: no field images ({'/'.join(FIELD_SUFFIXES)}) inside")
        return images

    def describe(self) -> dict[str, Any]:
        """Kind, path, cell kind, crop size, box origin and detector parameters."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "cells": self.cells,
            "crop_size": self.crop_size,
            "boxes": self.boxes,
            "detector": dict(vars(self.config)),
        }

    def origin(self, bag_id: str) -> BagOrigin:
        """The field image (and VOC annotation) by name, size and mtime, with the detection settings."""
        path = self.image_path(bag_id)
        stamps = [file_stamp(path)]
        if self.boxes == "voc":
            xml = annotation_path(path)
            stamps.append(file_stamp(xml) if xml is not None else None)
        settings = {k: v for k, v in self.describe().items() if k not in ("kind", "path")}
        text = json.dumps(settings, sort_keys=True, default=str)
        return BagOrigin(self.kind, str(path.resolve()), -1, text, digest(stamps, settings), unit="images")

    def bag_ids(self) -> list[str]:
        """Image file stems, sorted."""
        return sorted(self._images)

    def image_path(self, bag_id: str) -> Path:
        """The image file of a bag."""
        if bag_id not in self._images:
            raise self._unknown_bag(bag_id)
        return self._images[bag_id]

    def detect(self, bag_id: str, image: np.ndarray | None = None) -> Detections:
        """The cells of one field (detector or VOC boxes), in raster order.

        Raises:
            ImageReadError: the image cannot be decoded (``image`` not given).
            UserError: ``boxes="voc"`` and the image has no annotation file.
        """
        path = self.image_path(bag_id)
        rgb = read_rgb(path) if image is None else image
        if self.boxes == "detect":
            return order_raster(detect_cells(rgb, self.cells, self.config))
        xml = annotation_path(path)
        if xml is None:
            raise UserError(f"{path}: no VOC annotation (Annotations/{path.stem}.xml)")
        ann = read_voc(xml, width=rgb.shape[1], height=rgb.shape[0])
        b = ann.as_array(self.cells.upper())  # (k, 4) x0, y0, x1, y1
        centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
        areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        det = Detections(centres, np.round(b).astype(np.int64), areas, np.ones(len(b)))
        return order_raster(det)

    def iter_cells(self, bag_id: str) -> Iterator[Cell]:
        """Yield one crop per cell of the field; an unreadable image is recorded and yields nothing."""
        path = self.image_path(bag_id)
        try:
            rgb = read_rgb(path)
            det = self.detect(bag_id, rgb)
        except (ImageReadError, UserError) as exc:
            self.record_failure(path, str(exc), bag_id)
            return
        from feature_cache.sources.detect_ops import background_rgb

        fill = np.round(background_rgb(rgb)).astype(np.uint8)
        cell_type = self.cells.upper() if self.boxes == "voc" else None
        for i, (x, y) in enumerate(det.centres):
            crop = crop_centered(rgb, x, y, self.crop_size, fill)
            yield Cell(crop, (round(x), round(y)), f"{self.cells}{i:04d}", cell_type)


register_source("fields", FieldSource)

__all__ = ["FIELD_SUFFIXES", "FieldSource", "default_crop_size"]
