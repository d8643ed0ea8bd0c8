"""Tiled detection over a slide's working image, with de-duplication across tile borders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from feature_cache.progress import progress
from feature_cache.sources.detect import Detections, DetectorConfig, detect_cells
from feature_cache.sources.fields import order_raster
from feature_cache.sources.slide_io import SlideScale, read_rgb_region

MERGE_DISTANCE = {"wbc": 0.6, "rbc": 0.3}  # in red-cell diameters


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, length)`` with ``overlap``."""
    stride = max(tile - overlap, 1)
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(starts[-1] + stride)
    return starts


def core_bounds(starts: list[int], i: int, tile: int, overlap: int) -> tuple[float, float]:
    """The half-open range owned by tile ``i``: the tile minus ``overlap / 2`` on inner sides."""
    lo = -np.inf if i == 0 else starts[i] + overlap / 2
    hi = np.inf if i == len(starts) - 1 else starts[i] + tile - overlap / 2
    return lo, hi


def merge_close(det: Detections, radius: float) -> Detections:
    """Greedy non-maximum suppression: of centres closer than ``radius``, keep the higher score."""
    if len(det) < 2 or radius <= 0:
        return det
    from scipy.spatial import cKDTree

    order = np.argsort(-det.scores, kind="stable")
    tree = cKDTree(det.centres)
    removed = np.zeros(len(det), dtype=bool)
    for i in order:
        if removed[i]:
            continue
        for j in tree.query_ball_point(det.centres[i], r=radius):
            if j != i:
                removed[j] = True
    return det.select(~removed)


def _mask_fraction(mask: np.ndarray, mask_down: float, scale: SlideScale, x0: int, y0: int, w: int, h: int) -> float:
    f = scale.downsample / mask_down  # mask pixels per working pixel
    r0, r1 = int(y0 * f), int(np.ceil((y0 + h) * f))
    c0, c1 = int(x0 * f), int(np.ceil((x0 + w) * f))
    window = mask[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)]
    return float(window.mean()) if window.size else 0.0


def detect_tiled(
    slide: Any,
    scale: SlideScale,
    cells: str,
    config: DetectorConfig,
    tile: int,
    overlap: int,
    mask: np.ndarray | None = None,
    mask_down: float = 1.0,
    min_smear_fraction: float = 0.0,
    on_failure: Callable[[str, str], object] | None = None,
) -> Detections:
    """Run the detector tile by tile over the working image.

    Args:
        slide: an open OpenSlide handle.
        scale: the working scale.
        cells: ``"wbc"`` or ``"rbc"``.
        config: detector parameters at the working scale.
        tile: tile side in working pixels.
        overlap: overlap between neighbouring tiles in working pixels.
        mask: smear-area mask; tiles below ``min_smear_fraction`` of it are skipped.
        mask_down: level-0 pixels per mask pixel.
        min_smear_fraction: see ``mask``.
        on_failure: called with (``"tile x=..,y=.."``, reason) for a tile OpenSlide cannot read; the
            tile is skipped. Without it the error propagates.

    Returns:
        De-duplicated detections in working pixels, raster order.
    """
    xs = tile_starts(scale.width, tile, overlap)
    ys = tile_starts(scale.height, tile, overlap)
    grid = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    parts: list[Detections] = []
    for iy, ix in progress(grid, desc="detect", unit="tile", leave=False):
        x0, y0 = xs[ix], ys[iy]
        w, h = min(tile, scale.width - x0), min(tile, scale.height - y0)
        if mask is not None and _mask_fraction(mask, mask_down, scale, x0, y0, w, h) < min_smear_fraction:
            continue
        try:
            rgb = read_rgb_region(slide, scale, x0, y0, w, h)  # (h, w, 3)
        except Exception as exc:  # OpenSlide raises its own error types for corrupt tiles
            if on_failure is None:
                raise
            on_failure(f"tile x={x0},y={y0}", f"cannot read tile ({exc})")
            continue
        det = detect_cells(rgb, cells, config)
        if not len(det):
            continue
        centres = det.centres + np.array([x0, y0], dtype=np.float64)
        xlo, xhi = core_bounds(xs, ix, tile, overlap)
        ylo, yhi = core_bounds(ys, iy, tile, overlap)
        own = (centres[:, 0] >= xlo) & (centres[:, 0] < xhi) & (centres[:, 1] >= ylo) & (centres[:, 1] < yhi)
        boxes = det.boxes + np.array([x0, y0, x0, y0], dtype=np.int64)
        parts.append(Detections(centres[own], boxes[own], det.areas[own], det.scores[own]))
    merged = merge_close(Detections.concat(parts), MERGE_DISTANCE[cells] * config.rbc_diameter_px)
    return order_raster(merged)
