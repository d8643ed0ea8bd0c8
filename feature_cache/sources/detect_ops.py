"""Image operations behind the cell detector: colour deconvolution and fast morphology.

Everything here is numpy + ``scipy.ndimage``. Morphology with a disk is computed through the
Euclidean distance transform (exact disks, cost independent of the radius), which keeps the
detector fast on whole-slide tiles.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# Stain optical-density directions (R, G, B) of a Romanowsky (Wright/Giemsa/May-Grünwald) smear,
# measured on BCCD fields after dividing by the background: the violet nucleus stain (azure/
# methylene-blue eosinate, absorbs red and green, slightly brighter than the glass in blue) and the
# eosin of red cells (absorbs green and blue). The third direction is their cross product.
NUCLEUS_OD = (0.563, 0.811, -0.195)
EOSIN_OD = (0.140, 0.748, 0.664)


def _stain_inverse() -> np.ndarray:
    n = np.asarray(NUCLEUS_OD, dtype=np.float64)
    e = np.asarray(EOSIN_OD, dtype=np.float64)
    n, e = n / np.linalg.norm(n), e / np.linalg.norm(e)
    r = np.cross(n, e)
    r /= np.linalg.norm(r)
    return np.linalg.inv(np.stack([n, e, r])).astype(np.float32)  # (3, 3): od @ inv -> stains


_STAIN_INV = _stain_inverse()


def background_rgb(rgb: np.ndarray, percentile: float = 95.0) -> np.ndarray:
    """Per-channel brightness of the glass (illumination), robust to a field crowded with cells.

    Args:
        rgb: (H, W, 3) uint8 image.
        percentile: brightness percentile taken as the background.

    Returns:
        (3,) float32 background colour, at least 64 per channel.
    """
    flat = rgb.reshape(-1, 3)
    if flat.shape[0] > 200_000:  # a strided sample is enough for a percentile
        flat = flat[:: flat.shape[0] // 200_000]
    bg = np.percentile(flat, percentile, axis=0).astype(np.float32)
    return np.maximum(bg, 64.0)


def stain_concentrations(rgb: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Colour deconvolution (Ruifrok & Johnston) into nucleus, eosin and residual channels.

    Args:
        rgb: (H, W, 3) uint8 image.
        background: (3,) glass colour; estimated from the image when ``None``.

    Returns:
        (H, W, 3) float32 concentrations; channel 0 is the nucleus stain (about 0.6 in a WBC
        nucleus, 0.25 in a platelet, below 0.05 in red cells and on glass).
    """
    bg = background_rgb(rgb) if background is None else np.asarray(background, dtype=np.float32)
    od = np.log((bg + 1.0) / (rgb.astype(np.float32) + 1.0))  # (H, W, 3) optical density vs glass
    return od @ _STAIN_INV


def disk_dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a Euclidean disk of ``radius`` pixels."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask) <= radius


def disk_erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary erosion by a Euclidean disk (pixels outside the image count as background)."""
    if radius <= 0:
        return mask.copy()
    padded = np.pad(mask, 1)
    return (ndi.distance_transform_edt(padded) > radius)[1:-1, 1:-1]


def disk_open(mask: np.ndarray, radius: float) -> np.ndarray:
    """Opening (erode then dilate): removes specks thinner than ``2 * radius``."""
    return disk_dilate(disk_erode(mask, radius), radius)


def disk_close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Closing (dilate then erode): bridges gaps narrower than ``2 * radius``."""
    if radius <= 0:
        return mask.copy()
    pad = int(np.ceil(radius)) + 1
    padded = np.pad(mask, pad)
    closed = disk_erode(disk_dilate(padded, radius), radius)
    return closed[pad:-pad, pad:-pad]


def hysteresis(score: np.ndarray, low: float, high: float) -> np.ndarray:
    """Pixels above ``low`` connected to at least one pixel above ``high``."""
    weak = score > low
    labels, n = ndi.label(weak)
    if n == 0:
        return weak
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(labels[score > high])] = True
    keep[0] = False
    return keep[labels]


def remove_small(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_area`` pixels."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= min_area
    keep[0] = False
    return keep[labels]


def local_maxima(values: np.ndarray, min_distance: float, threshold: float) -> np.ndarray:
    """Peaks of ``values`` at least ``min_distance`` apart and above ``threshold``.

    Plateaus count once (their first pixel in raster order after suppression).

    Returns:
        (k, 2) int64 (row, col) peak positions, strongest first.
    """
    size = max(3, int(2 * round(min_distance) + 1))
    peaks = (values == ndi.maximum_filter(values, size=size, mode="constant")) & (values > threshold)
    rows, cols = np.nonzero(peaks)
    order = np.argsort(-values[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    kept: list[int] = []
    min_d2 = min_distance**2
    for i in range(len(rows)):  # greedy suppression of plateau twins and near peaks
        if all((rows[i] - rows[j]) ** 2 + (cols[i] - cols[j]) ** 2 >= min_d2 for j in kept):
            kept.append(i)
    return np.stack([rows[kept], cols[kept]], axis=1).astype(np.int64) if kept else np.zeros((0, 2), np.int64)


def watershed_split(mask: np.ndarray, min_distance: float, min_height: float) -> np.ndarray:
    """Split touching blobs along the valleys of their distance transform (marker watershed).

    Args:
        mask: (H, W) bool foreground.
        min_distance: minimum distance in pixels between two object centres.
        min_height: a centre must lie at least this far from the background.

    Returns:
        (H, W) int32 labels, 0 = background; blobs without a marker keep one label.
    """
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    dist = ndi.gaussian_filter(dist, sigma=max(1.0, min_distance / 8))
    peaks = local_maxima(np.where(mask, dist, 0), min_distance, min_height)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # blobs without any marker get one at their deepest point so that they are not lost
    blobs, nblobs = ndi.label(mask)
    if nblobs:
        has = np.zeros(nblobs + 1, dtype=bool)
        has[blobs[peaks[:, 0], peaks[:, 1]]] = True
        missing = [i for i in range(1, nblobs + 1) if not has[i]]
        if missing:
            pos = ndi.maximum_position(dist, blobs, missing)
            for k, (r, c) in enumerate(pos):
                markers[r, c] = len(peaks) + 1 + k
    depth = dist.max() if dist.size else 0.0
    relief = np.round((depth - dist) / max(depth, 1e-6) * 254).astype(np.uint8)  # ridges between cells are high
    relief[~mask] = 255  # flooding never crosses the background
    labels = ndi.watershed_ift(relief, markers, structure=np.ones((3, 3), dtype=bool))
    labels[~mask] = 0
    return labels.astype(np.int32)
