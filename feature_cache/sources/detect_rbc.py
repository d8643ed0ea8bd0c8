"""Red-cell detection for anemia work: a gradient Hough transform for discs.

Red cells in a smear overlap and their central pallor is often as bright as the glass, so a
foreground mask followed by a watershed merges clumps and splits rings. Instead every strong edge
pixel votes for the centres that lie 0.3–0.6 red-cell diameters away *against* its brightness
gradient (a red cell is darker than the glass around it); the smoothed vote map peaks at cell
centres, and each peak that sits on stained, non-white-cell area is one red cell.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from feature_cache.sources import detect_ops as ops

_REF_CONTRAST = 0.15  # summed optical density of a reference red cell over the glass


def _vote_map(od: np.ndarray, diameter: float) -> np.ndarray:
    """(H, W) Hough votes for disc centres; each edge pixel votes with its (capped) contrast."""
    smooth = ndi.gaussian_filter(od, sigma=max(1.0, diameter / 25))
    gy = ndi.sobel(smooth, axis=0)  # OD grows towards the inside of a cell
    gx = ndi.sobel(smooth, axis=1)
    mag = np.hypot(gx, gy)
    cap = 8.0 * _REF_CONTRAST / max(diameter / 10, 1.0)  # sobel slope of the reference rim
    rows, cols = np.nonzero(mag > 0.1 * cap)
    weight = np.minimum(mag[rows, cols], cap) / cap
    ux, uy = gx[rows, cols] / mag[rows, cols], gy[rows, cols] / mag[rows, cols]
    h, w = od.shape
    votes = np.zeros(h * w, dtype=np.float64)
    for r in np.linspace(0.3 * diameter, 0.6 * diameter, 7):  # walk up the gradient, into the cell
        vr = np.round(rows + r * uy).astype(np.int64)
        vc = np.round(cols + r * ux).astype(np.int64)
        ok = (vr >= 0) & (vr < h) & (vc >= 0) & (vc < w)
        votes += np.bincount(vr[ok] * w + vc[ok], weights=weight[ok], minlength=h * w)
    return ndi.gaussian_filter(votes.reshape(h, w), sigma=max(1.0, diameter / 12))


@lru_cache(maxsize=32)
def _reference_peak(diameter: float) -> float:
    """Peak vote of an ideal red cell (a blurred disc of the reference contrast)."""
    size = int(np.ceil(2 * diameter)) | 1
    yy, xx = np.mgrid[:size, :size] - size // 2
    disc = (np.hypot(yy, xx) <= diameter / 2).astype(np.float32) * _REF_CONTRAST
    disc = ndi.gaussian_filter(disc, sigma=max(1.0, diameter / 20))
    return float(_vote_map(disc, diameter)[size // 2, size // 2])


def disc_centres(
    rgb_small: np.ndarray,
    diameter: float,
    background: np.ndarray,
    exclude: np.ndarray | None = None,
    min_votes_frac: float = 0.3,
    min_density: float = 0.1,
    min_distance_frac: float = 0.4,
) -> tuple[np.ndarray, np.ndarray]:
    """Centres of dark discs of about ``diameter`` pixels.

    Args:
        rgb_small: (H, W, 3) uint8 image at the working scale.
        diameter: red-cell diameter in pixels at this scale.
        background: (3,) glass colour.
        exclude: (H, W) bool pixels where no centre may lie (white cells).
        min_votes_frac: a peak needs this fraction of an ideal red cell's votes.
        min_density: a centre's neighbourhood must be at least this optically dense (summed OD).
        min_distance_frac: two centres are at least this many diameters apart (cells overlap).

    Returns:
        (k, 2) float64 (row, col) centres and (k,) float64 strengths (1 = an ideal red cell).
    """
    od = np.log((background + 1.0) / (rgb_small.astype(np.float32) + 1.0)).sum(axis=2)  # (H, W)
    strength = _vote_map(od, diameter) / _reference_peak(round(float(diameter), 1))
    allowed = ndi.uniform_filter(od, size=max(3, int(diameter / 3))) > min_density
    if exclude is not None:
        allowed &= ~exclude
    peaks = ops.local_maxima(np.where(allowed, strength, 0.0), min_distance_frac * diameter, min_votes_frac)
    values = strength[peaks[:, 0], peaks[:, 1]] if len(peaks) else np.zeros(0)
    return peaks.astype(np.float64), values.astype(np.float64)
