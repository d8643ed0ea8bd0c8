"""Stain spaces and stain normalisation for blood-smear crops.

- :func:`rgb_to_hed` / :func:`hed_to_rgb`: Ruifrok-Johnston colour deconvolution into haematoxylin,
  eosin and DAB optical densities, the maths of scikit-image's ``rgb2hed``/``hed2rgb`` written in torch
  so that stain jitter runs batched on the training device (checked against scikit-image in the tests;
  speed in ``benchmarks/bench_encoders.py colour``). Romanowsky stains (May-Grünwald-Giemsa, Wright)
  are not H&E, but their two dyes (a basic blue-purple and an acidic pink) deconvolve onto the H and E
  axes well enough for *jitter*: what matters is perturbing the dye amounts, not naming them.
- :class:`StainNormalizer`: Reinhard (match the mean and standard deviation of each CIELAB channel
  to a target) or Macenko (estimate the two stain vectors from the optical densities and map the
  stain concentrations onto a target's vectors and 99th-percentile concentrations), fitted **per
  bag**: a bag is one smear, so all its crops share one stain, and a 28-px crop alone holds too few
  stained pixels to estimate stain vectors from. ``describe()`` goes into the bank fingerprint.

Hand-written (numpy / scikit-image): ``torchstain`` normalises one image at a time with its own
fitting, has no per-bag fit and would be a new dependency for a few dozen lines of linear algebra.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from feature_cache.errors import InvalidArgumentError

log = logging.getLogger(__name__)

#: scikit-image's ``rgb_from_hed`` (rows: haematoxylin, eosin, DAB optical-density vectors).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = float(np.log(1e-6))
METHODS = ("reinhard", "macenko")


def rgb_to_hed(x, clamp: bool = True):
    """RGB in [0, 1] -> HED stain densities, as scikit-image's ``rgb2hed``.

    Args:
        x: (N, 3, H, W) float tensor in [0, 1].
        clamp: clip negative densities to 0 (scikit-image does; jitter keeps them so the round
            trip is exact).

    Returns:
        (N, 3, H, W) stain densities.
    """
    import torch

    m = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype, device=x.device)
    od = torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST  # (N, 3, H, W)
    hed = torch.einsum("nchw,cd->ndhw", od, m)
    return hed.clamp_min(0) if clamp else hed


def hed_to_rgb(hed):
    """HED stain densities -> RGB in [0, 1], as scikit-image's ``hed2rgb``; (N, 3, H, W) -> (N, 3, H, W)."""
    import torch

    m = torch.as_tensor(RGB_FROM_HED, dtype=hed.dtype, device=hed.device)
    log_rgb = torch.einsum("nchw,cd->ndhw", hed, m) * _LOG_ADJUST
    return torch.exp(log_rgb).clamp(0, 1)


def _pixels(crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """All pixels of the crops as (P, 3) float64 RGB in [0, 1]."""
    if isinstance(crops, np.ndarray) and crops.ndim == 4:
        return crops.reshape(-1, 3).astype(np.float64) / 255.0
    return np.concatenate([np.asarray(c).reshape(-1, 3) for c in crops]).astype(np.float64) / 255.0


def _foreground(rgb: np.ndarray, od_threshold: float = 0.15) -> np.ndarray:
    """Pixels that hold stain (optical density above the threshold in some channel): (P,) bool."""
    od = -np.log(np.clip(rgb, 1 / 255, 1))
    return od.max(axis=1) > od_threshold


@dataclass(frozen=True)
class StainTarget:
    """What crops are normalised towards.

    Attributes:
        lab_mean: CIELAB channel means (Reinhard).
        lab_std: CIELAB channel standard deviations (Reinhard).
        stains: (2, 3) unit optical-density vectors of the two dyes, the nuclear (bluer) one first (Macenko).
        max_conc: 99th-percentile concentration of each dye (Macenko).
    """

    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    stains: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_conc: tuple[float, float]

    def describe(self) -> str:
        """Canonical text (3 decimals) for the fingerprint."""
        def fmt(v: Sequence[float]) -> str:
            return ",".join(f"{float(a):.3f}" for a in v)

        return (f"lab_mean={fmt(self.lab_mean)};lab_std={fmt(self.lab_std)};"
                f"stains={fmt(self.stains[0])}/{fmt(self.stains[1])};max_conc={fmt(self.max_conc)}")  # fmt: skip


def lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each CIELAB channel over (P, 3) RGB pixels in [0, 1]."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb.reshape(-1, 1, 3)).reshape(-1, 3)
    return lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-3)


def macenko_stains(rgb: np.ndarray, alpha: float = 1.0, beta: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Macenko et al. 2009: the two stain vectors and 99th-percentile concentrations of (P, 3) pixels.

    Returns:
        ``(stains (2, 3), max_conc (2,))``; the bluer (nuclear) stain first.

    Raises:
        InvalidArgumentError: fewer than 10 stained pixels.
    """
    od = -np.log(np.clip(rgb, 1 / 255, 1))  # (P, 3)
    od = od[(od > beta).all(axis=1)]
    if len(od) < 10:
        raise InvalidArgumentError(f"Macenko needs stained pixels; found {len(od)} (an empty or white crop set?)")
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]  # (3, 2) the two largest
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = v1 * np.sign(v1.sum() or 1), v2 * np.sign(v2.sum() or 1)  # positive densities
    stains = np.stack([v1, v2]) if v1[0] > v2[0] else np.stack([v2, v1])  # more red absorbed: nuclear first
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]  # (2, P)
    return stains, np.maximum(np.percentile(conc, 99, axis=1), 1e-6)


def fit_target(crops: Sequence[np.ndarray] | np.ndarray) -> StainTarget:
    """A :class:`StainTarget` fitted on reference crops (all their pixels pooled)."""
    rgb = _pixels(crops)
    mean, std = lab_stats(rgb)
    stains, conc = macenko_stains(rgb)
    def r(v: np.ndarray) -> tuple:
        return tuple(round(float(a), 4) for a in v)

    return StainTarget(r(mean), r(std), (r(stains[0]), r(stains[1])), r(conc))


#: Default target: :func:`fit_target` on the first 40 BloodMNIST training cells of each of the 8 types
#: (PBC data, May-Grünwald-Giemsa); ``benchmarks/bench_encoders.py colour`` recomputes it.
DEFAULT_TARGET = StainTarget(
    lab_mean=(71.7751, 15.0602, -1.0514),
    lab_std=(21.6851, 11.5696, 19.8777),
    stains=((0.5166, 0.8291, 0.2137), (0.3936, 0.5001, 0.7713)),
    max_conc=(2.4662, 0.8813),
)


class StainNormalizer:
    """Normalise the stain of a set of crops (one bag) towards a target.

    Args:
        method: ``reinhard`` or ``macenko``.
        target: the target statistics (default :data:`DEFAULT_TARGET`).

    Picklable (data-loader workers).
    """

    def __init__(self, method: str, target: StainTarget | None = None) -> None:
        if method not in METHODS:
            raise InvalidArgumentError(f"stain normalisation must be one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        self.target = target or DEFAULT_TARGET

    def describe(self) -> str:
        """Canonical text for the bank fingerprint (method, per-bag fit, target)."""
        return f"stain_norm={self.method},per=bag,{self.target.describe()}"

    def __call__(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The crops of one bag, normalised with statistics fitted on all of them; (H, W, 3) uint8 each."""
        if len(crops) == 0:
            return []
        rgb = _pixels(crops)
        fg = _foreground(rgb)
        if fg.sum() < 10:  # blank crops: nothing to fit, nothing to change
            return [np.asarray(c) for c in crops]
        out = self._reinhard(rgb) if self.method == "reinhard" else self._macenko(rgb)
        out = np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)
        pieces, start = [], 0
        for c in crops:
            n = c.shape[0] * c.shape[1]
            pieces.append(out[start : start + n].reshape(c.shape))
            start += n
        return pieces

    def _reinhard(self, rgb: np.ndarray) -> np.ndarray:
        from skimage.color import lab2rgb, rgb2lab

        lab = rgb2lab(rgb.reshape(-1, 1, 3)).reshape(-1, 3)
        mean, std = lab_stats(rgb)
        t_mean, t_std = np.asarray(self.target.lab_mean), np.asarray(self.target.lab_std)
        lab = (lab - mean) / std * t_std + t_mean
        with warnings.catch_warnings():  # out-of-gamut colours are clipped, as intended
            warnings.simplefilter("ignore", UserWarning)
            return lab2rgb(lab.reshape(-1, 1, 3)).reshape(-1, 3)

    def _macenko(self, rgb: np.ndarray) -> np.ndarray:
        try:
            stains, max_conc = macenko_stains(rgb)
        except InvalidArgumentError:
            log.debug("Macenko: too few stained pixels in a bag; left unchanged")
            return rgb
        od = -np.log(np.clip(rgb, 1 / 255, 1))  # (P, 3)
        conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]  # (2, P)
        conc *= (np.asarray(self.target.max_conc) / max_conc)[:, None]
        od_new = (np.asarray(self.target.stains).T @ conc).T  # (P, 3)
        return np.exp(-od_new)

    def __repr__(self) -> str:
        return f"StainNormalizer({self.method!r})"


def colour_statistics(crops: Sequence[np.ndarray] | np.ndarray) -> dict[str, list[float]]:
    """Colour statistics of a set of crops: RGB, CIELAB and HED means / stds, and stain vectors.

    Returns:
        ``{"rgb_mean", "rgb_std", "lab_mean", "lab_std", "hed_mean", "hed_std", "stains", "max_conc",
        "foreground_fraction"}`` (lists of floats).
    """
    import torch

    rgb = _pixels(crops)
    fg = _foreground(rgb)
    mean, std = lab_stats(rgb)
    hed = rgb_to_hed(torch.from_numpy(rgb.T.reshape(1, 3, -1, 1)).float()).reshape(3, -1).T.numpy()
    try:
        stains, conc = macenko_stains(rgb)
    except InvalidArgumentError:
        stains, conc = np.full((2, 3), np.nan), np.full(2, np.nan)
    return {"rgb_mean": (rgb.mean(0) * 255).tolist(), "rgb_std": (rgb.std(0) * 255).tolist(),
            "lab_mean": mean.tolist(), "lab_std": std.tolist(), "hed_mean": hed.mean(0).tolist(),
            "hed_std": hed.std(0).tolist(), "stains": stains.tolist(), "max_conc": conc.tolist(),
            "foreground_fraction": float(fg.mean())}  # fmt: skip
