"""Temperature scaling (Guo et al. 2017), fitted on the validation fold only."""

from __future__ import annotations

import numpy as np


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
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


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
