"""Single cells for encoder training and probes: a class-per-folder crop tree, a CSV, or BloodMNIST's ``.npz``.

- **Folder**: ``ROOT/<class>/<crop>.png`` (labelled); for self-supervised training any folder of crops
  (searched recursively) will do.
- **CSV**: columns ``path`` and ``label`` (optional ``split``: ``train``/``val``/``test``; ``label`` optional
  for self-supervised training); paths relative to the CSV's folder. Further columns may be read as
  categorical cell attributes (``attributes=``: e.g. the WBCAtt-style ``nc_ratio`` or ``auer_rods`` of a
  synthetic cohort's ``cells.csv``), an empty value meaning unknown.
- **``.npz``**: MedMNIST layout (``train_images``, ``train_labels``, ``val_*``, ``test_*``); 8-class files are
  named with BloodMNIST's cell types. The official split of every cell is kept.

Everything is checked before training starts, and every problem is one line naming the file: a label
file naming missing images (all of them counted, the first named), an unreadable or corrupt image,
a 16-bit or floating-point image (its intensities would have to be rescaled, and the rescaling would
not be the one extraction applies), a single class, and (:func:`check_sizes`) crops too small for
the network's input.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from feature_cache.errors import UserError
from feature_cache.sources.image_io import IMAGE_SUFFIXES, is_image_file

log = logging.getLogger(__name__)

UNLABELLED = -1
SPLITS = ("train", "val", "test")
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass
class CellSet:
    """Crops with labels.

    Attributes:
        images: (H, W, 3) uint8 crops (sizes may differ), or one (n, H, W, 3) array.
        labels: (n,) class index, ``UNLABELLED`` (-1) when unknown.
        classes: class names (index -> name).
        names: where each crop comes from (a file path, or ``FILE:split:i``).
        split: (n,) official split of each crop (``""`` when none).
        source: the folder or file read.
        fingerprint: SHA-256 of the pixels, labels, splits and attributes (what a trained encoder saw).
        attributes: attribute name -> (n,) value index per crop, ``UNLABELLED`` (-1) when unknown.
        attribute_values: attribute name -> its values (index -> text).
    """

    images: list[np.ndarray] | np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    names: list[str]
    split: np.ndarray
    source: str
    fingerprint: str = field(default="")
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    attribute_values: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | Sequence[int]) -> CellSet:
        """The crops at ``idx`` (same classes; the fingerprint is recomputed)."""
        idx = np.asarray(idx, dtype=np.int64)
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        out = replace(self, images=images, labels=self.labels[idx], names=[self.names[i] for i in idx],
                      split=self.split[idx], fingerprint="",
                      attributes={a: v[idx] for a, v in self.attributes.items()})  # fmt: skip
        out.fingerprint = fingerprint(out)
        return out

    def of_split(self, name: str) -> CellSet:
        """The crops of one official split."""
        return self.subset(np.nonzero(self.split == name)[0])

    def counts(self) -> dict[str, int]:
        """Crops per class name."""
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}


def fingerprint(cells: CellSet) -> str:
    """SHA-256 of the crops' pixels and shapes, labels, splits and class names."""
    h = hashlib.sha256()
    h.update(repr(cells.classes).encode())
    h.update(np.ascontiguousarray(cells.labels, dtype=np.int64).tobytes())
    h.update("\0".join(map(str, cells.split)).encode())
    for name, codes in sorted(cells.attributes.items()):  # none: the same fingerprint as before attributes existed
        h.update(repr((name, cells.attribute_values[name])).encode())
        h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    if isinstance(cells.images, np.ndarray):
        h.update(repr(cells.images.shape).encode())
        h.update(np.ascontiguousarray(cells.images).tobytes())
    else:
        for img in cells.images:
            h.update(repr(img.shape).encode())
            h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


def read_image(path: Path) -> np.ndarray:
    """An 8-bit RGB crop; (H, W, 3) uint8.

    Raises:
        UserError: missing, corrupt, 16-bit or floating-point image (naming the file).
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            if img.mode in _WIDE_MODES:
                raise UserError(f"{path}: {img.mode} image ({'16-bit' if '16' in img.mode else 'not 8-bit'}); "
                                "encoder training takes 8-bit RGB crops (convert it, e.g. scaling by its "
                                "real intensity range)")  # fmt: skip
            img.load()
            if img.mode in ("RGBA", "LA", "P", "PA"):
                img = img.convert("RGBA")
                white = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, img)
            rgb = np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file (corrupt or another format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UserError(f"{path}: corrupt image ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise UserError(f"{path}: empty image")
    return np.ascontiguousarray(rgb)


def _finish(cells: CellSet, labelled: bool, where: str) -> CellSet:
    if labelled:
        present = sorted(set(cells.labels[cells.labels >= 0].tolist()))
        if (cells.labels < 0).any():
            raise UserError(f"{where}: {int((cells.labels < 0).sum())} crop(s) have no label")
        if len(present) < 2:
            only = cells.classes[present[0]] if present else "none"
            raise UserError(f"{where}: a single class ({only}); supervised training and probes need at least two")
    if len(cells) == 0:
        raise UserError(f"{where}: no crops found")
    cells.fingerprint = fingerprint(cells)
    return cells


def read_folder(root: Path, labelled: bool = True) -> CellSet:
    """Crops of a class-per-folder tree (``labelled``), or of any folder, recursively (unlabelled)."""
    if labelled:
        classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not classes:
            raise UserError(f"{root}: no class folders (expected ROOT/<class>/<crop>.png)")
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if is_image_file(f)]
        stray = [f for f in root.iterdir() if is_image_file(f)]
        if stray:
            log.warning("%s: %d image(s) directly in the root are not in a class folder and are ignored (e.g. %s)",
                        root, len(stray), stray[0].name)  # fmt: skip
    else:
        classes = ()
        files = [(f, UNLABELLED) for f in sorted(root.rglob("*")) if is_image_file(f)]
    images = [read_image(f) for f, _ in files]
    labels = np.array([lab for _, lab in files], dtype=np.int64)
    names = [str(f) for f, _ in files]
    return _finish(CellSet(images, labels, classes, names, np.full(len(files), "", dtype=object), str(root)),
                   labelled, str(root))  # fmt: skip


def read_csv_table(path: Path, labelled: bool = True, attributes: Sequence[str] = ()) -> CellSet:
    """Crops listed in a CSV (``path``, ``label``, optional ``split``; ``attributes``: further columns read as
    categorical cell attributes, an empty value meaning unknown)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: unreadable CSV ({exc})") from None
    cols = set(rows[0]) if rows else set()
    need = {"path", "label"} if labelled else {"path"}
    if not rows or not need <= cols:
        raise UserError(f"{path}: needs columns {', '.join(sorted(need))} (found: {', '.join(sorted(cols)) or 'none'})")
    absent = [a for a in attributes if a not in cols]
    if absent:
        raise UserError(f"{path}: no attribute column {', '.join(absent)} (columns: {', '.join(sorted(cols))})")
    clash = [a for a in attributes if a in ("path", "label", "split")]
    if clash:
        raise UserError(f"{path}: {', '.join(clash)} is not an attribute column (path, label and split are read "
                        "as such)")  # fmt: skip
    base = path.parent
    files = [(base / r["path"]).resolve() if not Path(r["path"]).is_absolute() else Path(r["path"]) for r in rows]
    missing = [(i + 2, r["path"]) for i, (r, f) in enumerate(zip(rows, files, strict=True)) if not f.is_file()]
    if missing:
        line, name = missing[0]
        raise UserError(f"{path}: names {len(missing)} missing image(s), e.g. line {line}: {name}")
    bad_suffix = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    if bad_suffix:
        raise UserError(f"{path}: {bad_suffix[0]} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
    raw = [str(r.get("label") or "").strip() for r in rows] if "label" in cols else [""] * len(rows)
    classes = tuple(sorted({v for v in raw if v}))
    labels = np.array([classes.index(v) if v else UNLABELLED for v in raw], dtype=np.int64)
    split = np.array([str(r.get("split") or "").strip().lower() for r in rows], dtype=object)
    odd = sorted({s for s in split if s and s not in SPLITS})
    if odd:
        raise UserError(f"{path}: unknown split value(s) {', '.join(odd)} (use {', '.join(SPLITS)})")
    codes, values = {}, {}
    for a in attributes:
        text = [str(r.get(a) or "").strip() for r in rows]
        values[a] = tuple(sorted({v for v in text if v}))
        codes[a] = np.array([values[a].index(v) if v else UNLABELLED for v in text], dtype=np.int64)
    images = [read_image(f) for f in files]
    return _finish(CellSet(images, labels, classes, [str(f) for f in files], split, str(path), attributes=codes,
                           attribute_values=values), labelled, str(path))  # fmt: skip


def read_npz(path: Path, labelled: bool = True) -> CellSet:
    """All splits of a MedMNIST-style ``.npz`` (each cell keeps its official split)."""
    from feature_cache.sources.bloodmnist import CELL_TYPES

    try:
        with np.load(path) as data:
            parts = [(s, data[f"{s}_images"], data[f"{s}_labels"].reshape(-1)) for s in SPLITS if f"{s}_images" in data]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: not a readable MedMNIST .npz ({exc})") from None
    if not parts:
        raise UserError(f"{path}: no train_images / val_images / test_images arrays")
    for s, x, y in parts:
        if x.dtype != np.uint8:
            raise UserError(f"{path}: {s}_images are {x.dtype}, not 8-bit; convert them to uint8 RGB")
        if x.ndim != 4 or x.shape[3] != 3:
            raise UserError(f"{path}: {s}_images have shape {x.shape}, expected (n, H, W, 3) RGB")
        if len(y) != len(x):
            raise UserError(f"{path}: {len(x)} {s}_images but {len(y)} {s}_labels")
    images = np.concatenate([x for _, x, _ in parts])
    labels = np.concatenate([y for _, _, y in parts]).astype(np.int64)
    n_classes = int(labels.max()) + 1
    classes = CELL_TYPES if n_classes == len(CELL_TYPES) else tuple(str(i) for i in range(n_classes))
    split = np.concatenate([np.full(len(x), s, dtype=object) for s, x, _ in parts])
    names = [f"{path}:{s}:{i}" for s, x, _ in parts for i in range(len(x))]
    return _finish(CellSet(images, labels, classes, names, split, str(path)), labelled, str(path))


def read_cells(path: str | Path, labelled: bool = True, attributes: Sequence[str] = ()) -> CellSet:
    """Read crops from a folder, a CSV or an ``.npz`` (see the module docstring).

    Args:
        path: the input.
        labelled: labels are required (supervised training, probes); ``False`` reads crops only.
        attributes: CSV columns read as categorical cell attributes (a CSV input only).

    Raises:
        UserError: any problem with the input, naming the file.
    """
    path = Path(path)
    if attributes and (path.is_dir() or path.suffix.lower() != ".csv"):
        raise UserError(f"{path}: cell attributes ({', '.join(attributes)}) are read from a CSV's columns; "
                        "give a CSV (path,label,<attribute columns>)")  # fmt: skip
    if path.is_dir():
        return read_folder(path, labelled)
    if not path.exists():
        raise UserError(f"{path}: not found")
    if path.suffix.lower() == ".csv":
        return read_csv_table(path, labelled, attributes)
    if path.suffix.lower() == ".npz":
        return read_npz(path, labelled)
    raise UserError(f"{path}: expected a class-per-folder crop tree, a .csv (path,label) or a MedMNIST .npz")


def check_sizes(cells: CellSet, image_size: int, max_upscale: float, minimum: int) -> None:
    """Refuse crops too small for the network.

    A crop is refused when its shorter side is below the network's minimum input, or when it would be
    enlarged more than ``max_upscale`` times to reach ``image_size`` (a tiny crop is almost always a
    detection or export error; BloodMNIST's 28 px cells at 96 px need 3.4x).

    Raises:
        UserError: naming the first such crop and how many there are.
    """
    if isinstance(cells.images, np.ndarray):
        sides = np.full(len(cells), min(cells.images.shape[1:3]))
    else:
        sides = np.array([min(img.shape[:2]) for img in cells.images])
    limit = max(minimum, image_size / max_upscale)
    small = np.nonzero(sides < limit)[0]
    if len(small):
        i = small[0]
        raise UserError(f"{cells.names[i]}: crop of {sides[i]} px is smaller than the network's input allows "
                        f"({image_size} px input, at most {max_upscale:g}x enlargement, so >= {limit:g} px; "
                        f"{len(small)} crop(s) in {cells.source}); raise --max-upscale or lower --image-size")
