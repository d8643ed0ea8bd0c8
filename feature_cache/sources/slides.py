"""Whole slides through OpenSlide: smear-area mask, tiled detection, crops, level-0 coordinates.

One bag per slide; the bag id is the slide file stem. ``path`` is a slide file or a folder of
slides (DICOM files of one slide, which share OpenSlide's quick hash, count once).

Per slide:
  1. the *working scale* is a pyramid level (``level``) or a resolution (``mpp``, read from the
     nearest finer level and resized);
  2. a smear-area mask is computed on a low-resolution level (:func:`smear_mask`);
  3. the working image is read in ``tile_size`` tiles overlapping by ``overlap`` pixels (at least
     2.5 red-cell diameters, so every cell lies whole in some tile); tiles outside the mask are
     skipped; the detector runs on each tile;
  4. a detection is kept only by the tile whose *core* (the tile minus half the overlap on every
     inner side) holds its centre, then centres closer than half a cell are merged across tiles;
  5. crops of ``crop_size`` working pixels are read around each centre; coordinates are level-0
     pixels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources.base import BagOrigin, BagSource, Cell, digest, file_stamp
from feature_cache.sources.detect import CELL_KINDS, Detections, DetectorConfig
from feature_cache.sources.fields import default_crop_size
from feature_cache.sources.registry import register_source
from feature_cache.sources.slide_io import (
    SLIDE_SUFFIXES,
    SlideScale,
    choose_scale,
    find_slides,
    open_slide,
    read_rgb_region,
    smear_mask,
)
from feature_cache.sources.slide_tiles import detect_tiled

log = logging.getLogger(__name__)


class SlideSource(BagSource):
    """Cells detected on whole slides read with OpenSlide.

    Args:
        path: a slide file (``.svs``, ``.tif``, ``.ndpi``, ``.mrxs``, ``.dcm``, ...) or a folder.
        cells: ``"wbc"`` or ``"rbc"``.
        level: pyramid level to work at (default 0 unless ``mpp`` is given).
        mpp: microns per pixel to work at (needs the slide's resolution).
        tile_size: tile side in working pixels (raised to 3 x ``overlap`` where smaller).
        overlap: tile overlap in working pixels (default 2.5 red-cell diameters).
        crop_size: crop side in working pixels (default as for fields: 2.4 / 1.4 red cells).
        rbc_diameter_um: red-cell diameter in microns, used with the slide's resolution.
        rbc_diameter_px: red-cell diameter in level-0 pixels; overrides the above (needed when a
            slide has no resolution; else 100 level-0 pixels is assumed, with a warning).
        min_smear_fraction: tiles whose smear-mask fraction is below this are skipped.
        detector: detector options overriding the defaults.

    Raises:
        UserError: a file that is not a slide, or a folder without slides.
        InvalidArgumentError: bad option values.
    """

    kind = "slides"

    def __init__(
        self,
        path: str | Path,
        cells: str = "wbc",
        level: int | None = None,
        mpp: float | None = None,
        tile_size: int = 1024,
        overlap: int | None = None,
        crop_size: int | None = None,
        rbc_diameter_um: float = 7.5,
        rbc_diameter_px: float | None = None,
        min_smear_fraction: float = 0.01,
        detector: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if cells not in CELL_KINDS:
            raise InvalidArgumentError(f"cells must be one of {CELL_KINDS}, got {cells!r}")
        if level is not None and mpp is not None:
            raise InvalidArgumentError("give either level or mpp, not both")
        if tile_size < 32:
            raise InvalidArgumentError(f"tile_size must be >= 32 pixels, got {tile_size}")
        self.path = Path(path)
        self.cells = cells
        self.level = level
        self.mpp = mpp
        self.tile_size = int(tile_size)
        self.overlap = overlap
        self.crop_size = crop_size
        self.rbc_diameter_um = float(rbc_diameter_um)
        self.rbc_diameter_px = rbc_diameter_px
        self.min_smear_fraction = float(min_smear_fraction)
        self.detector = dict(detector or {})
        DetectorConfig().replace(**self.detector)  # validate option names now
        self._slides = find_slides(self.path, self.record_failure)
        self._handle: tuple[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # OpenSlide handles do not pickle; workers reopen
        return state

    def describe(self) -> dict[str, Any]:
        """Kind, path and reading options."""
        keys = ("cells", "level", "mpp", "tile_size", "overlap", "crop_size", "rbc_diameter_um", "rbc_diameter_px")
        return {"kind": self.kind, "path": str(self.path), **{k: getattr(self, k) for k in keys}}

    def origin(self, bag_id: str) -> BagOrigin:
        """The slide file by name, size and mtime, with the reading and detection settings."""
        path = self.slide_path(bag_id)
        settings = {k: v for k, v in self.describe().items() if k not in ("kind", "path")}
        settings.update(min_smear_fraction=self.min_smear_fraction, detector=self.detector)
        text = json.dumps(settings, sort_keys=True, default=str)
        return BagOrigin(self.kind, str(path.resolve()), -1, text, digest([file_stamp(path)], settings), unit="files")

    def bag_ids(self) -> list[str]:
        """Slide file stems, sorted."""
        return sorted(self._slides)

    def slide_path(self, bag_id: str) -> Path:
        """The file OpenSlide opens for a bag."""
        if bag_id not in self._slides:
            raise self._unknown_bag(bag_id)
        return self._slides[bag_id]

    def _open(self, bag_id: str) -> Any:
        path = self.slide_path(bag_id)
        if self._handle is None or self._handle[0] != bag_id:
            if self._handle is not None:
                self._handle[1].close()
            self._handle = (bag_id, open_slide(path))
        return self._handle[1]

    def scale(self, bag_id: str) -> SlideScale:
        """The working scale of one slide (level, resize factor, red-cell size)."""
        slide = self._open(bag_id)
        return choose_scale(
            slide, self.slide_path(bag_id), self.level, self.mpp, self.rbc_diameter_um, self.rbc_diameter_px
        )

    def detect(self, bag_id: str) -> tuple[Detections, SlideScale]:
        """Cells of one slide in *working* pixels (raster order, de-duplicated) and the scale."""
        slide = self._open(bag_id)
        scale = self.scale(bag_id)
        config = DetectorConfig(rbc_diameter_px=scale.rbc_px).replace(**self.detector)
        overlap = int(self.overlap if self.overlap is not None else np.ceil(2.5 * scale.rbc_px))
        if overlap < 0:
            raise InvalidArgumentError(f"overlap must be >= 0, got {overlap}")
        tile = max(self.tile_size, 3 * overlap)  # a cell must fit whole in the tile that owns it
        if tile != self.tile_size:
            log.info("%s: tile size raised from %d to %d (3 x overlap)", bag_id, self.tile_size, tile)
        mask, mask_down = smear_mask(slide)
        path = self.slide_path(bag_id)

        def tile_failed(where: str, reason: str) -> None:
            self.record_failure(f"{path}#{where}", reason, bag_id)

        det = detect_tiled(
            slide, scale, self.cells, config, tile, overlap, mask, mask_down, self.min_smear_fraction, tile_failed
        )
        return det, scale

    def iter_cells(self, bag_id: str) -> Iterator[Cell]:
        """Yield one crop per detected cell; coordinates in level-0 pixels."""
        path = self.slide_path(bag_id)
        try:
            det, scale = self.detect(bag_id)
        except UserError as exc:
            self.record_failure(path, str(exc), bag_id)
            return
        slide = self._open(bag_id)
        crop = int(self.crop_size or default_crop_size(self.cells, scale.rbc_px))
        for i, (x, y) in enumerate(det.centres):
            x0w, y0w = x - crop / 2, y - crop / 2
            try:
                pixels = read_rgb_region(slide, scale, x0w, y0w, crop)
            except Exception as exc:
                self.record_failure(f"{path}#x={x:.0f},y={y:.0f}", f"cannot read region ({exc})", bag_id)
                continue
            lx, ly = (round(v * scale.downsample) for v in (x, y))
            yield Cell(pixels, (lx, ly), f"{self.cells}{i:05d}", None)

    def close(self) -> None:
        """Close the open slide handle, if any."""
        if self._handle is not None:
            self._handle[1].close()
            self._handle = None


register_source("slides", SlideSource)

__all__ = ["SLIDE_SUFFIXES", "SlideSource"]
