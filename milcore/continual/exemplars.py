"""Exemplar ranking: which bags a memory keeps and which of their cells, in priority order.

Pure numpy functions, used by the replay strategies:

- :func:`milreplay_scores` -- the MIL-specific rehearsal of Ebrahimi et al. (2025, "Continual Multiple
  Instance Learning for Hematologic Disease Diagnosis"): a cell's score is a weighted sum of its
  attention, its distance to the class mean and its distance to its bag's mean, each min-max
  normalised within the bag; the best-scored cells form the stored pseudo-bag.
- :func:`herding_order` -- iCaRL's herding (Rebuffi et al. 2017) on bag embeddings.
- :func:`confidence_uncertainty_order` -- exemplars by confidence and uncertainty (Sadafi et al. 2023,
  cross-domain white-cell classification): most confident and most uncertain bags, interleaved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feature_cache.config import Config, option


@dataclass(frozen=True)
class MILReplayWeights(Config):
    """Weights of the MIL-replay cell score (defaults from Ebrahimi et al. 2025).

    Attributes:
        attention: weight of the (min-max normalised) attention.
        class_distance: weight of the (normalised) Euclidean distance to the class mean.
        bag_distance: weight of the (normalised) Euclidean distance to the bag mean.
    """

    config_key = "milreplay weight"

    attention: float = option(0.5, low=0)
    class_distance: float = option(0.3, low=0)
    bag_distance: float = option(0.2, low=0)


def minmax(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant vector becomes zeros."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    lo, hi = float(v.min()), float(v.max())
    return np.zeros_like(v) if hi - lo <= 1e-12 else (v - lo) / (hi - lo)


def milreplay_scores(
    x: np.ndarray, attention: np.ndarray, class_mean: np.ndarray, weights: MILReplayWeights | None = None
) -> np.ndarray:
    """Score the cells of one bag for MIL replay (higher = keep first).

    Args:
        x: (n, D) the bag's instance features.
        attention: (n,) its attention (for a multi-branch model, the column of the bag's class).
        class_mean: (D,) mean instance feature of the bag's class.
        weights: the three weights.

    Returns:
        (n,) ``w_a * mm(attention) + w_c * mm(||x - class_mean||) + w_b * mm(||x - bag_mean||)``, where
        ``mm`` is min-max normalisation within the bag.
    """
    w = weights or MILReplayWeights()
    x = np.asarray(x, dtype=np.float64)  # (n, D)
    d_class = np.linalg.norm(x - np.asarray(class_mean, dtype=np.float64)[None], axis=1)  # (n,)
    d_bag = np.linalg.norm(x - x.mean(axis=0, keepdims=True), axis=1)  # (n,)
    return w.attention * minmax(attention) + w.class_distance * minmax(d_class) + w.bag_distance * minmax(d_bag)


def interleave_random(ranked: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Mix a ranking with random picks so that every prefix holds about ``share`` random cells.

    Args:
        ranked: (n,) positions, best first.
        share: fraction of each prefix drawn at random from the cells not yet taken (0 = ``ranked``).
        rng: random generator.

    Returns:
        (n,) a permutation of ``ranked``.
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    if share <= 0 or len(ranked) < 2:
        return ranked
    shuffled = ranked[rng.permutation(len(ranked))]
    taken: set[int] = set()
    out: list[int] = []
    pointers = {"best": 0, "random": 0}
    n_random = 0
    while len(out) < len(ranked):
        use_random = n_random + 1 <= share * (len(out) + 1)  # keep the random share of every prefix
        key, source = ("random", shuffled) if use_random else ("best", ranked)
        k = pointers[key]
        while int(source[k]) in taken:
            k += 1
        out.append(int(source[k]))
        taken.add(int(source[k]))
        pointers[key] = k + 1
        n_random += int(use_random)
    return np.asarray(out, dtype=np.int64)


def herding_order(embeddings: np.ndarray, k: int | None = None) -> np.ndarray:
    """iCaRL herding: bags in the order that keeps the running mean closest to the class mean.

    Args:
        embeddings: (B, E) bag embeddings of one class (L2-normalised here, as in iCaRL).
        k: how many to order (default all).

    Returns:
        (k,) bag positions, without repetition.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # (B, E)
    k = len(e) if k is None else min(k, len(e))
    mu = e.mean(axis=0)  # (E,)
    chosen: list[int] = []
    running = np.zeros_like(mu)
    free = np.ones(len(e), dtype=bool)
    for t in range(1, k + 1):
        candidates = (running[None] + e) / t  # (B, E) mean if each bag were added
        dist = np.linalg.norm(mu[None] - candidates, axis=1)
        dist[~free] = np.inf
        best = int(np.argmin(dist))
        chosen.append(best)
        free[best] = False
        running += e[best]
    return np.asarray(chosen, dtype=np.int64)


def confidence_uncertainty_order(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Bags interleaved: most confident, most uncertain, second most confident, ... (Sadafi et al. 2023).

    Confidence is the predicted probability of the bag's true class; uncertainty the entropy of the
    predicted distribution.

    Args:
        proba: (B, C) predicted probabilities.
        labels: (B,) true labels.

    Returns:
        (B,) bag positions, each once.
    """
    p = np.asarray(proba, dtype=np.float64)
    conf = p[np.arange(len(p)), np.asarray(labels, dtype=np.int64)]
    entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
    by_conf = list(np.argsort(-conf, kind="stable"))
    by_unc = list(np.argsort(-entropy, kind="stable"))
    order: list[int] = []
    taken: set[int] = set()
    while len(order) < len(p):
        for queue in (by_conf, by_unc):
            while queue and queue[0] in taken:
                queue.pop(0)
            if queue:
                b = int(queue.pop(0))
                order.append(b)
                taken.add(b)
    return np.asarray(order, dtype=np.int64)
