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


def watershed_split(mask: np.ndarray, min_distance: float, min_height: float, min_dip: float = 0.0) -> np.ndarray:
    """Split touching blobs along the necks of their distance transform (marker watershed).

    Markers are distance-transform maxima at least ``min_distance`` apart and ``min_height`` deep.
    Two neighbouring regions are merged back when the neck between them is shallow: when the
    lower of their two peaks exceeds the deepest point of their common border by less than
    ``min_dip`` (an h-maxima criterion that keeps the lobes of one nucleus together).

    Args:
        mask: (H, W) bool foreground.
        min_distance: minimum distance in pixels between two object centres.
        min_height: a centre must lie at least this far (pixels) from the background.
        min_dip: minimum depth (pixels) of the neck between two kept objects.

    Returns:
        (H, W) int32 labels, 0 = background; blobs without a marker keep one label.
    """
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    peaks = local_maxima(dist, min_distance, min_height)
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
    labels = flood(dist, markers, mask)
    return _merge_shallow(labels, dist, min_dip) if min_dip > 0 else labels


def flood(height: np.ndarray, markers: np.ndarray, mask: np.ndarray, levels: int = 64) -> np.ndarray:
    """Marker watershed by immersion: labels grow from the highest ``height`` downwards.

    At each of ``levels`` descending thresholds, every label spreads (8-connected, geodesically)
    into the unlabelled ``mask`` pixels whose height reaches the threshold, so two basins meet on
    the ridge of lowest height between their markers. (``scipy.ndimage.watershed_ift`` lets one
    marker flood its neighbour's basin on such inputs, so it is not used.)

    Args:
        height: (H, W) float relief; markers sit on its peaks.
        markers: (H, W) int labels (> 0) of the seeds, 0 elsewhere.
        mask: (H, W) bool pixels to label.
        levels: number of immersion steps.

    Returns:
        (H, W) int32 labels, 0 outside ``mask`` and where no marker can reach.
    """
    labels = np.where(mask, markers, 0).astype(np.int32)
    box = ndi.find_objects(mask.astype(np.int8))
    if not box or box[0] is None or not labels.any():
        return labels
    sl = box[0]
    lab, hgt, msk = labels[sl], height[sl], mask[sl]
    top = float(hgt[msk].max())
    for t in np.linspace(top, float(hgt[msk].min()), levels):
        allowed = msk & (hgt >= t)
        while True:
            grown = ndi.grey_dilation(lab, size=(3, 3))
            new = allowed & (lab == 0) & (grown > 0)
            if not new.any():
                break
            lab[new] = grown[new]
    labels[sl] = lab
    return labels


def _merge_shallow(labels: np.ndarray, dist: np.ndarray, min_dip: float) -> np.ndarray:
    """Merge neighbouring labels whose separating neck is less than ``min_dip`` below both peaks."""
    n = int(labels.max())
    if n < 2:
        return labels
    peak = np.zeros(n + 1, dtype=np.float64)
    peak[1:] = ndi.maximum(dist, labels, np.arange(1, n + 1))
    saddle: dict[tuple[int, int], float] = {}
    for a, b, da, db in (
        (labels[:, :-1], labels[:, 1:], dist[:, :-1], dist[:, 1:]),
        (labels[:-1, :], labels[1:, :], dist[:-1, :], dist[1:, :]),
    ):
        edge = (a != b) & (a > 0) & (b > 0)
        for la, lb, v in zip(a[edge], b[edge], np.minimum(da[edge], db[edge]), strict=True):
            key = (int(min(la, lb)), int(max(la, lb)))
            saddle[key] = max(saddle.get(key, 0.0), float(v))
    parent = list(range(n + 1))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (la, lb), s in sorted(saddle.items(), key=lambda kv: -kv[1]):  # deepest necks first
        ra, rb = find(la), find(lb)
        if ra != rb and min(peak[ra], peak[rb]) - s < min_dip:
            parent[rb] = ra
            peak[ra] = max(peak[ra], peak[rb])
    roots = np.array([find(i) for i in range(n + 1)])
    _, dense = np.unique(roots, return_inverse=True)
    return dense.astype(np.int32)[labels]
