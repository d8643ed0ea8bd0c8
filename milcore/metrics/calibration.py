"""Softmax and temperature scaling (Guo et al. 2017), fitted on the validation fold only, with its search bounds."""

from __future__ import annotations

import math

import numpy as np

#: Search range of the temperature. A fitted T at (within 1% of) a bound means calibration failed:
#: at the upper bound the validation logits carried no usable information, so the probabilities are
#: flattened to near-uniform; at the lower bound the validation fold was perfectly separated, so T
#: could only run down and the probabilities are sharpened to near 0/1 (overconfident on new patients).
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
BOUND_RTOL = 0.01


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` on (validation) labels ``y``.

    A bounded scalar search over log T (the NLL is convex in 1/T), so it never diverges on
    perfectly separated validation sets: T then runs to the lower bound.

    Args:
        logits: (n, C) uncalibrated logits.
        y: (n,) integer labels.
        bounds: search range of T.

    Returns:
        The fitted temperature (1.0 for an empty set).
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    res = minimize_scalar(
        lambda log_t: _nll(logits, y, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(res.x))


def temperature_at_bound(temperature: float, bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
                         rtol: float = BOUND_RTOL) -> str | None:  # fmt: skip
    """``"upper"`` or ``"lower"`` when ``temperature`` is within ``rtol`` (relative) of a bound of the search.

    Args:
        temperature: a fitted temperature.
        bounds: the search range it was fitted in.
        rtol: relative tolerance (the bounded search stops about 1e-4 short of a bound).

    Returns:
        ``"upper"`` (probabilities flattened towards uniform), ``"lower"`` (sharpened towards 0/1) or
        ``None`` (inside the range, or not a finite number).
    """
    t = float(temperature)
    if not math.isfinite(t):
        return None
    lo, hi = bounds
    if t >= hi * (1 - rtol):
        return "upper"
    if t <= lo * (1 + rtol):
        return "lower"
    return None


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
