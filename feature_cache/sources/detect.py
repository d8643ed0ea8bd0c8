"""Cell detection in smear fields: white cells by their violet nucleus stain, red cells for anemia.

White cells (:func:`detect_wbc`):
  1. colour deconvolution into a nucleus-stain channel (:mod:`.detect_ops`), the glass colour
     estimated per image so that illumination does not matter;
  2. hysteresis threshold (strong stain seeds, grown into weaker stain) and an opening that
     removes specks; components smaller than a platelet clump are dropped;
  3. a closing bridges the lobes of a segmented nucleus into one cell;
  4. blobs too big for one nucleus are split with a marker watershed on the distance transform
     (touching white cells);
  5. one detection per blob: centre, box, area and mean stain.

Red cells (:func:`detect_rbc`): non-glass pixels (optical density), holes (central pallor) filled,
white-cell regions removed, then a distance-transform watershed splits the touching discs.

All sizes derive from one number, the red-cell diameter in pixels (``rbc_diameter_px``), so the
same code serves 640×480 BCCD fields (≈100 px) and slide tiles at any resolution. Images are
shrunk internally to ``work_rbc_px`` pixels per red cell before detection (speed), and results
are mapped back to input pixels.

:func:`detect_wbc_threshold` is the plain baseline (fixed colour threshold on the violet stain plus
morphological clean-up), kept to compare against in ``benchmarks/bench_detect.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from feature_cache.config import Config, option
from feature_cache.errors import InvalidArgumentError
from feature_cache.sources import detect_ops as ops

CELL_KINDS = ("wbc", "rbc")


@dataclass(frozen=True)
class DetectorConfig(Config):
    """Detector parameters; every length is a fraction of the red-cell diameter.

    Attributes:
        rbc_diameter_px: typical red-cell diameter in input pixels (≈7.5 µm).
        work_rbc_px: red-cell diameter after the internal downscale (never upscaled).
        nucleus_low: hysteresis low threshold on the nucleus-stain concentration.
        nucleus_high: hysteresis high threshold (seeds).
        open_frac: opening radius that removes specks.
        close_frac: closing radius that joins the lobes of one nucleus.
        min_nucleus_frac: smallest nucleus area, as a fraction of a red cell's area (drops platelets).
        min_inscribed_frac: smallest radius of the largest disk inside a nucleus (drops fibres and
            platelet chains); the image border counts as inside, so cells cut by it are kept.
        min_stain: smallest mean nucleus-stain concentration of a nucleus (drops pale smudges).
        split_area_frac: blobs larger than this (in red-cell areas) are watershed-split.
        split_distance_frac: minimum distance between two white-cell centres.
        split_dip_frac: two touching nuclei are split only where the neck between them is at
            least this much thinner than both (keeps the lobes of one nucleus together).
        rbc_min_votes: a red-cell centre needs this fraction of an ideal red cell's Hough votes.
        rbc_min_distance_frac: two red-cell centres are at least this many diameters apart.
    """

    config_key = "detector option"

    rbc_diameter_px: float = option(100.0, low=0, low_open=True)
    work_rbc_px: float = option(40.0, low=0, low_open=True)
    nucleus_low: float = 0.18
    nucleus_high: float = 0.40
    open_frac: float = 0.02
    close_frac: float = 0.10
    min_nucleus_frac: float = 0.35
    min_inscribed_frac: float = 0.26
    min_stain: float = 0.29
    split_area_frac: float = 0.6
    split_distance_frac: float = 0.5
    split_dip_frac: float = 0.25
    rbc_min_votes: float = 0.3
    rbc_min_distance_frac: float = 0.4


@dataclass(frozen=True)
class Detections:
    """Cells found in one image, in input pixels.

    Attributes:
        centres: (n, 2) float64 (x, y) centres.
        boxes: (n, 4) int64 (x0, y0, x1, y1) boxes, x1/y1 exclusive, clipped to the image.
        areas: (n,) float64 stained area (nucleus for white cells, cell for red cells) in pixels.
        scores: (n,) float64 mean nucleus-stain concentration (white) or optical density (red).
    """

    centres: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.centres.shape[0])

    @staticmethod
    def empty() -> Detections:
        """No detection."""
        return Detections(np.zeros((0, 2)), np.zeros((0, 4), np.int64), np.zeros(0), np.zeros(0))

    def select(self, keep: np.ndarray) -> Detections:
        """The detections at ``keep`` (bool mask or indices)."""
        return Detections(self.centres[keep], self.boxes[keep], self.areas[keep], self.scores[keep])

    @staticmethod
    def concat(parts: list[Detections]) -> Detections:
        """All detections of ``parts`` in order."""
        if not parts:
            return Detections.empty()
        return Detections(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


_FIELDS = ("centres", "boxes", "areas", "scores")


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidArgumentError(f"detector needs an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")


def _shrink(rgb: np.ndarray, cfg: DetectorConfig) -> tuple[np.ndarray, float]:
    """Downscale so a red cell spans ``work_rbc_px`` pixels; returns (image, scale factor)."""
    factor = max(1, int(np.floor(cfg.rbc_diameter_px / cfg.work_rbc_px)))
    if factor == 1:
        return rgb, 1.0
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    if h == 0 or w == 0:
        return rgb, 1.0
    small = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))  # box filter
    return np.round(small).astype(np.uint8), float(factor)


def _measure(labels: np.ndarray, n: int, score: np.ndarray, factor: float, shape: tuple[int, int]) -> Detections:
    """Centre, box, area and mean score of labels 1..n, mapped back to input pixels."""
    if n == 0:
        return Detections.empty()
    idx = np.arange(1, n + 1)
    ones = np.ones(labels.shape, dtype=np.float64)
    areas = ndi.sum(ones, labels, idx) * factor**2
    centres = np.asarray(ndi.center_of_mass(ones, labels, idx), dtype=np.float64)[:, ::-1]  # (n, 2) x, y
    centres = (centres + 0.5) * factor - 0.5
    scores = np.asarray(ndi.mean(score, labels, idx), dtype=np.float64)
    slices = ndi.find_objects(labels, max_label=n)
    boxes = np.zeros((n, 4), dtype=np.int64)
    h, w = shape
    for i, sl in enumerate(slices):
        if sl is None:
            continue
        boxes[i] = [sl[1].start * factor, sl[0].start * factor, sl[1].stop * factor, sl[0].stop * factor]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    keep = areas > 0
    return Detections(centres[keep], boxes[keep], areas[keep], scores[keep])


def nucleus_mask(rgb: np.ndarray, cfg: DetectorConfig, background: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool mask of white-cell nuclei (lobes joined) at the image's own resolution."""
    d = cfg.rbc_diameter_px
    stain = ops.stain_concentrations(rgb, background)[..., 0]  # (H, W)
    mask = ops.hysteresis(stain, cfg.nucleus_low, cfg.nucleus_high)
    mask = ops.disk_open(mask, cfg.open_frac * d)
    mask = ops.remove_small(mask, 0.25 * cfg.min_nucleus_frac * np.pi / 4 * d * d)
    mask = ops.disk_close(mask, cfg.close_frac * d)
    mask = ndi.binary_fill_holes(mask)
    return ops.remove_small(mask, cfg.min_nucleus_frac * np.pi / 4 * d * d)


def detect_wbc(rgb: np.ndarray, config: DetectorConfig | None = None) -> Detections:
    """Find white cells by their nucleus stain.

    Args:
        rgb: (H, W, 3) uint8 field or tile.
        config: detector parameters (defaults suit BCCD-like fields, ≈100 px per red cell).

    Returns:
        One detection per white cell; ``areas`` is the nucleus area.
    """
    _check_rgb(rgb)
    cfg = config or DetectorConfig()
    bg = ops.background_rgb(rgb)
    small, factor = _shrink(rgb, cfg)
    scfg = cfg.replace(rbc_diameter_px=cfg.rbc_diameter_px / factor)
    d = scfg.rbc_diameter_px
    mask = nucleus_mask(small, scfg, bg)
    labels, n = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return Detections.empty()
    area = np.bincount(labels.ravel(), minlength=n + 1)
    big = np.nonzero(area > cfg.split_area_frac * np.pi / 4 * d * d)[0]
    big = big[big > 0]
    if len(big):  # touching white cells: split the big blobs, renumber everything
        split = ops.watershed_split(
            np.isin(labels, big), cfg.split_distance_frac * d, cfg.min_inscribed_frac * d, cfg.split_dip_frac * d
        )
        small_blobs = np.where(np.isin(labels, big), 0, labels)
        relabel = np.zeros(n + 1, dtype=np.int32)
        kept = np.setdiff1d(np.arange(1, n + 1), big)
        relabel[kept] = np.arange(1, len(kept) + 1)
        labels = relabel[small_blobs]
        labels = np.where(split > 0, split + len(kept), labels)
        n = int(labels.max())
    stain = ops.stain_concentrations(small, bg)[..., 0]  # (h, w)
    # shape and stain filters, per blob
    idx = np.arange(1, n + 1)
    inside = ndi.distance_transform_edt(np.pad(labels > 0, 1, mode="edge"))[1:-1, 1:-1]
    radius = np.asarray(ndi.maximum(inside, labels, idx))
    mean_stain = np.asarray(ndi.mean(stain, labels, idx))
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = (
        (radius >= cfg.min_inscribed_frac * d)
        & (mean_stain >= cfg.min_stain)
        & (area >= cfg.min_nucleus_frac * np.pi / 4 * d * d)
    )
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    return _measure(relabel[labels], int(keep.sum()), stain, factor, rgb.shape[:2])


def detect_rbc(rgb: np.ndarray, config: DetectorConfig | None = None) -> Detections:
    """Find red cells with a gradient Hough transform for discs (:mod:`.detect_rbc`).

    Args:
        rgb: (H, W, 3) uint8 field or tile.
        config: detector parameters.

    Returns:
        One detection per red cell; boxes are one red-cell diameter wide around the centre,
        ``areas`` is the nominal disc area and ``scores`` the normalised vote strength.
    """
    from feature_cache.sources.detect_rbc import disc_centres

    _check_rgb(rgb)
    cfg = config or DetectorConfig()
    bg = ops.background_rgb(rgb)
    small, factor = _shrink(rgb, cfg)
    scfg = cfg.replace(rbc_diameter_px=cfg.rbc_diameter_px / factor)
    d = scfg.rbc_diameter_px
    white = ops.disk_dilate(nucleus_mask(small, scfg, bg), 0.4 * d)
    rc, strength = disc_centres(
        small, d, bg, exclude=white, min_votes_frac=cfg.rbc_min_votes, min_distance_frac=cfg.rbc_min_distance_frac
    )
    if len(rc) == 0:
        return Detections.empty()
    centres = (rc[:, ::-1] + 0.5) * factor - 0.5  # (k, 2) x, y in input pixels
    half = cfg.rbc_diameter_px / 2
    h, w = rgb.shape[:2]
    boxes = np.stack([centres[:, 0] - half, centres[:, 1] - half, centres[:, 0] + half, centres[:, 1] + half], 1)
    boxes = np.round(boxes).astype(np.int64)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    areas = np.full(len(centres), np.pi / 4 * cfg.rbc_diameter_px**2)
    return Detections(centres, boxes, areas, strength.astype(np.float64))


def detect_cells(rgb: np.ndarray, kind: str = "wbc", config: DetectorConfig | None = None) -> Detections:
    """Dispatch to :func:`detect_wbc` (``kind="wbc"``) or :func:`detect_rbc` (``kind="rbc"``)."""
    if kind == "wbc":
        return detect_wbc(rgb, config)
    if kind == "rbc":
        return detect_rbc(rgb, config)
    raise InvalidArgumentError(f"unknown cell kind {kind!r}; choose one of {CELL_KINDS}")


def detect_wbc_threshold(
    rgb: np.ndarray, margin: float = 30.0, min_area: float = 1500.0, close_radius: int = 8
) -> Detections:
    """The plain baseline: blue exceeds red and green by ``margin``, opening, closing, area filter.

    Sizes are in input pixels, tuned for BCCD fields (≈100 px per red cell).
    """
    _check_rgb(rgb)
    a = rgb.astype(np.int16)
    mask = (a[..., 2] - a[..., 0] > margin) & (a[..., 2] - a[..., 1] > margin)
    mask = ndi.binary_opening(mask, _disk(2))
    mask = ndi.binary_closing(mask, _disk(close_radius))
    labels, n = ndi.label(mask)
    det = _measure(labels, n, a[..., 2] - a[..., 0], 1.0, rgb.shape[:2])
    return det.select(det.areas >= min_area)


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r
