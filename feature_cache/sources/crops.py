"""Crop folders: ``<root>/<patient>/<cell>.(png|jpg|jpeg|tif|tiff|bmp)``, one bag per patient folder.

This is the layout of the Munich AML cohort and of ``milcore synth``. An optional
``<root>/cells.csv`` with columns ``patient_id`` (or ``bag_id``), ``cell_id`` and any of
``cell_type``, ``x``, ``y`` adds cell types and positions; without it coordinates are ``(-1, -1)``
and the type is ``None``. Cells are read in file-name order; the cell id is the file stem.
Unreadable images are skipped and recorded in :attr:`~feature_cache.sources.base.BagSource.failures`.

A crop larger than ``max_crop_pixels`` (default :data:`MAX_CROP_PIXELS`, 1024 x 1024) stops the
run with a :class:`~feature_cache.sources.base.InputRefusedError` naming the file: the size is read
from the header, nothing is decoded. Single-cell crops are a few hundred pixels on a side (a white
cell at 100x oil is about 150-400 px), so an image above the limit is almost surely a field or
slide image in the wrong folder, and encoding it as "a cell" (after a squeeze to the encoder's
input) would change the bag silently; refusing rather than skipping it keeps every bag as the
folder says. Real cells that large: raise the limit (``--max-crop-pixels``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources.base import (
    UNKNOWN_COORD,
    BagOrigin,
    BagSource,
    Cell,
    InputRefusedError,
    digest,
    file_stamp,
)
from feature_cache.sources.image_io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    ImageTooLargeError,
    is_image_file,
    read_rgb,
)
from feature_cache.sources.registry import register_source

CELL_TABLE = "cells.csv"
#: Default largest crop, in pixels (1024 x 1024); see the module docstring.
MAX_CROP_PIXELS = 1024 * 1024
#: The most ``max_crop_pixels`` may be raised to: twice PIL's default image limit, which PIL refuses.
CROP_PIXELS_CEILING = 2 * 89_478_485


def _read_cell_table(path: Path) -> dict[tuple[str, str], tuple[tuple[int, int], str | None]]:
    """(bag_id, cell_id) -> ((x, y), cell_type) from a ``cells.csv``."""
    out: dict[tuple[str, str], tuple[tuple[int, int], str | None]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or ())
            bag_col = "patient_id" if "patient_id" in cols else "bag_id"
            if bag_col not in cols or "cell_id" not in cols:
                raise UserError(f"{path}: needs columns patient_id (or bag_id) and cell_id, has {sorted(cols)}")
            for row in reader:
                x, y = row.get("x") or "", row.get("y") or ""
                coords = (int(float(x)), int(float(y))) if x and y else (UNKNOWN_COORD, UNKNOWN_COORD)
                out[(row[bag_col], row["cell_id"])] = (coords, row.get("cell_type") or None)
    except (OSError, ValueError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read cell table ({exc})") from exc
    return out


class CropFolderSource(BagSource):
    """Bags of pre-cut cell crops, one sub-folder per patient.

    Args:
        path: the root folder.
        suffixes: image suffixes to read (case-insensitive).
        cell_table: ``cells.csv`` with types/positions; default ``<root>/cells.csv`` when present,
            ``False`` to ignore it.
        max_crop_pixels: largest crop (width x height) accepted; a larger one stops the run.

    Raises:
        UserError: ``path`` is not a folder, or holds no patient folder with images.
        InvalidArgumentError: ``max_crop_pixels`` is not a whole number in [1, 178956970].
    """

    kind = "crops"

    def __init__(
        self,
        path: str | Path,
        suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
        cell_table: str | Path | bool | None = None,
        max_crop_pixels: int = MAX_CROP_PIXELS,
    ) -> None:
        super().__init__()
        if (
            isinstance(max_crop_pixels, bool)
            or not isinstance(max_crop_pixels, int)
            or not (1 <= max_crop_pixels <= CROP_PIXELS_CEILING)
        ):
            raise InvalidArgumentError(
                f"max_crop_pixels must be a whole number between 1 and {CROP_PIXELS_CEILING}, got {max_crop_pixels!r}"
            )
        self.max_crop_pixels = max_crop_pixels
        self.root = Path(path)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: crop folder not found (expected <root>/<patient>/<cell>.png)")
        self.suffixes = tuple(s.lower() for s in suffixes)
        self._bags = sorted(
            d.name
            for d in self.root.iterdir()
            if d.is_dir() and not d.name.startswith(".") and any(is_image_file(p, self.suffixes) for p in d.iterdir())
        )
        if not self._bags:
            raise UserError(f"{self.root}: no patient folder with {'/'.join(self.suffixes)} images inside")
        table_path: Path | None
        if cell_table is False:
            table_path = None
        elif cell_table is None or cell_table is True:
            table_path = self.root / CELL_TABLE if (self.root / CELL_TABLE).is_file() else None
        else:
            table_path = Path(cell_table)
        self.cell_table = table_path
        self._table: dict[tuple[str, str], tuple[tuple[int, int], str | None]] | None = None
        self._by_bag: dict[str, list[tuple[str, list[int], str | None]]] | None = None

    def describe(self) -> dict[str, Any]:
        """Kind, root, cell table and crop-size limit."""
        return {"kind": self.kind, "path": str(self.root), "cell_table": str(self.cell_table or ""),
                "max_crop_pixels": self.max_crop_pixels}  # fmt: skip

    def _table_rows(self) -> dict[tuple[str, str], tuple[tuple[int, int], str | None]]:
        if self.cell_table is not None and self._table is None:
            self._table = _read_cell_table(self.cell_table)
        return self._table or {}

    def _rows_by_bag(self) -> dict[str, list[tuple[str, list[int], str | None]]]:
        if self._by_bag is None:
            self._by_bag = {}
            for (bag, cid), (xy, ctype) in sorted(self._table_rows().items()):
                self._by_bag.setdefault(bag, []).append((cid, list(xy), ctype))
        return self._by_bag

    def origin(self, bag_id: str) -> BagOrigin:
        """The patient folder, its image files' (name, size, mtime) and its rows of the cell table."""
        files = self.files(bag_id)
        rows = self._rows_by_bag().get(bag_id, []) if self.cell_table is not None else None
        folder = (self.root / bag_id).resolve()
        return BagOrigin(self.kind, str(folder), len(files), "{}", digest([file_stamp(p) for p in files], rows),
                         unit="files")  # fmt: skip

    def bag_ids(self) -> list[str]:
        """Patient folder names, sorted."""
        return list(self._bags)

    def files(self, bag_id: str) -> list[Path]:
        """The image files of one bag, sorted by name."""
        if bag_id not in self._bags:
            raise self._unknown_bag(bag_id)
        folder = self.root / bag_id
        return sorted((p for p in folder.iterdir() if is_image_file(p, self.suffixes)), key=lambda p: p.name)

    def iter_cells(self, bag_id: str) -> Iterator[Cell]:
        """Yield every readable crop of the bag; unreadable files are recorded and skipped."""
        files = self.files(bag_id)
        table = self._table_rows()
        stems = [p.stem for p in files]
        clash = {s for s in stems if stems.count(s) > 1}
        for path in files:
            cell_id = path.name if path.stem in clash else path.stem
            try:
                pixels = read_rgb(path, max_pixels=self.max_crop_pixels)
            except ImageTooLargeError as exc:
                raise InputRefusedError(
                    f"{path}: too large for a single-cell crop ({exc}); a field or slide image in a crop folder? "
                    "Remove it, or raise the limit with --max-crop-pixels if these are real cells"
                ) from None
            except ImageReadError as exc:
                self.record_failure(path, str(exc), bag_id)
                continue
            coords, cell_type = table.get((bag_id, cell_id), ((UNKNOWN_COORD, UNKNOWN_COORD), None))
            yield Cell(pixels, coords, cell_id, cell_type)


register_source("crops", CropFolderSource)

__all__ = ["CELL_TABLE", "IMAGE_SUFFIXES", "MAX_CROP_PIXELS", "CropFolderSource"]
