"""Per-patient uncertainty, risk-coverage curves and abstention (patients referred for manual review).

Every score is normalised to ``[0, 1]`` (0: certain; 1: as uncertain as the score can be), so one
threshold convention serves every task and class count:

* ``entropy``: predictive entropy of the (ensemble-mean) probabilities, ``H(p) / log C``;
* ``least_confidence``: ``(1 - max p) / (1 - 1/C)`` (the "softmax response" of selective classification);
* ``disagreement``: fold-ensemble disagreement, the mutual information between the prediction and the
  fold model that made it, ``(H(mean_k p_k) - mean_k H(p_k)) / log C`` (needs two or more models);
* ``mc_dropout``: the same mutual information over Monte-Carlo dropout passes of each model, averaged over
  the models (only where a model has dropout; otherwise skipped with a note).

A selective classifier keeps the patients whose score is at most a threshold and refers the others for
manual review. :func:`risk_coverage` gives, for every coverage (share of patients kept, most certain
first), the error rate ("risk") and the balanced accuracy of the kept patients; tied scores are taken in
random order (their expected values), so a score that ties everyone scores exactly like a random ranking.
AURC is the mean risk over the coverages ``1/n .. n/n``; a random ranking's expected AURC is the error
rate at full coverage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from feature_cache.errors import InvalidArgumentError, UserError
from milcore.trust.scores import DEFAULT_SCORE, MC_SAMPLES, SCORES

__all__ = ["DEFAULT_SCORE", "MC_SAMPLES", "SCORES", "RiskCoverage", "Uncertainty", "check_threshold",
           "has_dropout", "mc_dropout_proba", "predictive_entropy", "referral_summary", "risk_coverage",
           "selective_summary", "uncertainty_scores"]

if TYPE_CHECKING:
    import torch

    from milcore.data.store import FeatureStore
    from milcore.training.trainer import Trainer

log = logging.getLogger(__name__)

#: Coverages every summary reports.
COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)
#: Balanced-accuracy levels for which the summary gives the largest coverage that reaches them.
TARGETS = (0.9, 0.95)
#: Points of a stored curve (the JSON keeps at most this many coverages).
CURVE_POINTS = 101
_EPS = 1e-12


# ----------------------------------------------------------------------------- scores
def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def predictive_entropy(proba: np.ndarray) -> np.ndarray:
    """(B,) ``H(p) / log C`` of (B, C) probabilities, in [0, 1]."""
    proba = np.asarray(proba, dtype=np.float64)
    return np.clip(_entropy(proba) / math.log(proba.shape[1]), 0.0, 1.0)


def least_confidence(proba: np.ndarray) -> np.ndarray:
    """(B,) ``(1 - max p) / (1 - 1/C)`` of (B, C) probabilities, in [0, 1]."""
    proba = np.asarray(proba, dtype=np.float64)
    c = proba.shape[1]
    return np.clip((1.0 - proba.max(axis=1)) / (1.0 - 1.0 / c), 0.0, 1.0)


def mutual_information(members: np.ndarray) -> np.ndarray:
    """(B,) normalised mutual information of (K, B, C) member probabilities: ``(H(mean) - mean H) / log C``.

    0 when every member predicts the same distribution; at most 1.
    """
    members = np.asarray(members, dtype=np.float64)
    if members.ndim != 3 or members.shape[0] < 2:
        raise ValueError(f"mutual information needs (K >= 2, B, C) member probabilities, got {members.shape}")
    mi = _entropy(members.mean(axis=0)) - _entropy(members).mean(axis=0)
    return np.clip(mi / math.log(members.shape[2]), 0.0, 1.0)


@dataclass
class Uncertainty:
    """Per-patient uncertainty scores (each (B,), in [0, 1]) and why any score is missing.

    Attributes:
        bag_ids: the patients, in score order.
        scores: score name -> (B,) values (only the scores that could be computed).
        notes: score name -> why it was skipped (e.g. ``"the model has no dropout"``).
        mc_samples: Monte-Carlo dropout passes per model (0 when not run).
    """

    bag_ids: list[str]
    scores: dict[str, np.ndarray]
    notes: dict[str, str] = field(default_factory=dict)
    mc_samples: int = 0

    def score(self, name: str, option: str = "--abstain-score") -> np.ndarray:
        """The (B,) values of one score; a :class:`UserError` saying why when it was not computed."""
        if name in self.scores:
            return self.scores[name]
        if name not in SCORES:
            raise InvalidArgumentError(f"{option} {name!r}: not an uncertainty score (choose from {', '.join(SCORES)})")
        raise UserError(f"{option} {name}: not available here ({self.notes.get(name, 'not computed')})")

    def columns(self) -> dict[str, np.ndarray]:
        """The scores as ``predictions.csv`` columns (``uncertainty_<score>``), in :data:`SCORES` order."""
        return {f"uncertainty_{k}": self.scores[k] for k in SCORES if k in self.scores}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (which scores, the skipped ones with their note)."""
        return {"scores": [k for k in SCORES if k in self.scores], "skipped": dict(self.notes),
                "mc_samples": self.mc_samples, "scale": "0 = certain, 1 = maximally uncertain"}  # fmt: skip


def uncertainty_scores(bag_ids: Sequence[str], proba: np.ndarray, *, members: np.ndarray | None = None,
                       mc: Sequence[np.ndarray] | None = None, notes: dict[str, str] | None = None,
                       mc_samples: int = 0) -> Uncertainty:  # fmt: skip
    """Every score that the inputs allow.

    Args:
        bag_ids: (B,) patients.
        proba: (B, C) the (ensemble-mean, calibrated) probabilities.
        members: (K, B, C) each ensemble member's probabilities (``disagreement`` when K >= 2).
        mc: per model with dropout, (S, B, C) Monte-Carlo dropout probabilities (``mc_dropout``).
        notes: why a score is absent (kept unless the score was computed after all).
        mc_samples: passes per model, for the record.
    """
    proba = np.asarray(proba, dtype=np.float64)
    scores = {"entropy": predictive_entropy(proba), "least_confidence": least_confidence(proba)}
    notes = dict(notes or {})
    if members is not None and len(members) >= 2:
        scores["disagreement"] = mutual_information(members)
    else:
        notes.setdefault("disagreement", "a single model: fold-ensemble disagreement needs two or more")
    if mc:
        scores["mc_dropout"] = np.mean([mutual_information(s) for s in mc], axis=0)
    else:
        notes.setdefault("mc_dropout", "not run")
    for k in scores:
        notes.pop(k, None)
    return Uncertainty(list(bag_ids), scores, notes, mc_samples if mc else 0)


# ----------------------------------------------------------------------------- MC dropout
def _dropout_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose training flag switches dropout on: ``nn.Dropout*`` with p > 0, and modules that apply
    functional dropout with a float ``dropout`` attribute > 0 (e.g. TransMIL's attention layers)."""
    from torch import nn

    found = []
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            if m.p > 0:
                found.append(m)
        elif isinstance(getattr(m, "dropout", None), float) and m.dropout > 0:
            found.append(m)
    return found


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether MC-dropout can sample this model (it has dropout with a rate above 0)."""
    return bool(_dropout_modules(model))


def _mc_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """A module that predicts like ``model`` in eval mode except that its dropout stays on."""
    from torch import nn

    from milcore.training.loop import forward

    class MCDropout(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.aggregator_name = f"{getattr(inner, 'aggregator_name', type(inner).__name__)} (MC dropout)"
            self._dropouts = _dropout_modules(inner)

        def train(self, mode: bool = True) -> MCDropout:
            super().train(mode)
            for m in self._dropouts:
                m.training = True  # this module only: its children keep the mode set above
            return self

        def forward(self, x, ptr, coords=None):
            return forward(self.inner, x, ptr, coords)

    return MCDropout(model)


def mc_dropout_proba(model: torch.nn.Module, store: FeatureStore, trainer: Trainer, temperature: float = 1.0, *,
                     samples: int = MC_SAMPLES, seed: int = 0) -> np.ndarray | None:  # fmt: skip
    """(S, B, C) calibrated probabilities of ``samples`` Monte-Carlo dropout passes, or ``None`` without dropout.

    The passes are seeded (``seed``, ``seed + 1``, ...) so a prediction is reproducible; the global torch
    random state is restored afterwards. The model is left in eval mode.
    """
    import torch

    from milcore.metrics.calibration import softmax

    if samples < 1 or not has_dropout(model):
        return None
    wrapper = _mc_wrapper(model)
    out = []
    devices = [trainer.device.index] if getattr(trainer.device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for s in range(samples):
            torch.manual_seed(seed + s)
            out.append(softmax(trainer.predict(wrapper, store, with_attention=False).logits, temperature))
    model.eval()
    return np.stack(out)


def dropout_note(models: Sequence[torch.nn.Module]) -> str | None:
    """Why MC-dropout is skipped for these models (``None`` when at least one has dropout)."""
    if any(has_dropout(m) for m in models):
        return None
    return ("the model has no dropout (dropout rate 0), so MC-dropout cannot sample it; train with e.g. "
            "model_args dropout=0.25 to get it")  # fmt: skip


# ----------------------------------------------------------------------------- abstention
def check_threshold(value: float, option: str = "--abstain-above") -> float:
    """The abstention threshold, refused (one line) outside the scores' range ``[0, 1)``."""
    try:
        u = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{option} {value!r}: not a number") from None
    if not math.isfinite(u) or not 0.0 <= u < 1.0:
        raise InvalidArgumentError(f"{option} {value}: outside the range of the normalised uncertainty scores "
                                   "[0, 1) (0 = certain, 1 = as uncertain as possible; e.g. 0.5 refers patients "
                                   "whose entropy is above half its maximum)")  # fmt: skip
    return u


def check_coverage_targets(values: Sequence[float], option: str = "--coverage-target") -> tuple[float, ...]:
    """Balanced-accuracy levels for "the coverage at which balanced accuracy reaches X", each in ``(0, 1]``
    (one-line error otherwise), merged with the default :data:`TARGETS`, sorted, without repeats."""
    out = list(TARGETS)
    for value in values:
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{option} {value!r}: not a number (a balanced accuracy in (0, 1])") from None
        if not math.isfinite(x) or not 0.0 < x <= 1.0:
            raise InvalidArgumentError(f"{option} {value}: a balanced accuracy must lie in (0, 1] (e.g. 0.97 for "
                                       "97%)")  # fmt: skip
        out.append(x)
    return tuple(sorted(set(out)))


def check_score_name(name: str, option: str = "--abstain-score") -> str:
    """``name`` if it is one of :data:`SCORES` (one-line error otherwise)."""
    if name not in SCORES:
        raise InvalidArgumentError(f"{option} {name!r}: not an uncertainty score (choose from {', '.join(SCORES)})")
    return name


def referral_summary(uncertainty: Uncertainty, score: str, threshold: float, labels: np.ndarray | None = None,
                     predicted: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """Which patients are referred for review (score above ``threshold``), with counts and, where labels are
    known, the accuracy of the accepted and the referred patients.

    Returns:
        ``{"score", "threshold", "referred", "patients", "coverage", "referred_ids", "sentence"}`` plus
        ``"accepted"`` / ``"referred_errors"`` when ``labels`` and ``predicted`` are given.
    """
    values = uncertainty.score(score)
    refer = values > threshold
    n, k = len(values), int(refer.sum())
    out: dict[str, Any] = {
        "score": score, "threshold": float(threshold), "referred": k, "patients": n,
        "coverage": float((n - k) / n) if n else float("nan"),
        "referred_ids": [b for b, r in zip(uncertainty.bag_ids, refer, strict=True) if r],
        "sentence": referral_sentence(k, n, score, threshold),
    }  # fmt: skip
    if labels is not None and predicted is not None:
        from milcore.metrics.classification import accuracy, balanced_accuracy

        labels = np.asarray(labels)
        known = labels >= 0
        num_classes = int(max(labels.max(initial=0), np.asarray(predicted).max(initial=0)) + 1)
        kept, gone = known & ~refer, known & refer
        out["accepted"] = {
            "n": int(kept.sum()),
            "balanced_accuracy": balanced_accuracy(labels[kept], predicted[kept], num_classes) if kept.any()
            else float("nan"),
            "accuracy": accuracy(labels[kept], predicted[kept]) if kept.any() else float("nan"),
        }  # fmt: skip
        out["all"] = {"n": int(known.sum()),
                      "balanced_accuracy": balanced_accuracy(labels[known], predicted[known], num_classes)
                      if known.any() else float("nan")}  # fmt: skip
        out["referred_errors"] = int((predicted[gone] != labels[gone]).sum())
        out["referred_labelled"] = int(gone.sum())
    return out


def referral_sentence(k: int, n: int, score: str, threshold: float) -> str:
    """``"3 of 40 patients referred for review (entropy above 0.50)"``."""
    return f"{k} of {n} patient{'s' * (n != 1)} referred for review ({score} above {threshold:g})"


# ----------------------------------------------------------------------------- risk-coverage
@dataclass
class RiskCoverage:
    """A selective classifier's risk and balanced accuracy at every coverage (most certain patients first).

    Attributes:
        score: the uncertainty score ranking the patients.
        coverage: (n,) ``k / n`` for ``k = 1 .. n`` kept patients.
        risk: (n,) expected error rate of the ``k`` kept patients (ties in random order).
        balanced_accuracy: (n,) balanced accuracy of the kept patients (expected counts under random tie order;
            classes absent from the kept patients do not count).
        threshold: (n,) score of the ``k``-th most certain patient: referring the patients above it keeps at
            least ``k`` (exactly ``k`` unless tied).
        boundaries: coverages reachable exactly by a threshold (ends of groups of tied scores).
        boundary_balanced_accuracy: balanced accuracy at each of ``boundaries`` (exact, no tie expectation).
        boundary_threshold: the threshold giving each of ``boundaries``.
    """

    score: str
    coverage: np.ndarray
    risk: np.ndarray
    balanced_accuracy: np.ndarray
    threshold: np.ndarray
    boundaries: np.ndarray
    boundary_balanced_accuracy: np.ndarray
    boundary_threshold: np.ndarray

    @property
    def n(self) -> int:
        """Patients ranked."""
        return len(self.coverage)

    @property
    def aurc(self) -> float:
        """Area under the risk-coverage curve: mean risk over ``k = 1 .. n`` (lower is better)."""
        return float(self.risk.mean()) if self.n else float("nan")

    @property
    def random_aurc(self) -> float:
        """Expected AURC of a random ranking: the error rate at full coverage."""
        return float(self.risk[-1]) if self.n else float("nan")

    @property
    def oracle_aurc(self) -> float:
        """AURC of the ideal ranking (every error last): the floor for these predictions."""
        n = self.n
        if not n:
            return float("nan")
        errors = round(self.risk[-1] * n)
        k = np.arange(1, n + 1)
        return float((np.maximum(0, k - (n - errors)) / k).mean())

    def at(self, coverage: float) -> dict[str, float]:
        """Risk, balanced accuracy and threshold when the ``ceil(coverage * n)`` most certain patients are kept."""
        k = min(self.n, max(1, math.ceil(coverage * self.n - 1e-9)))
        return {"coverage": float(k / self.n), "risk": float(self.risk[k - 1]),
                "balanced_accuracy": float(self.balanced_accuracy[k - 1]), "threshold": float(self.threshold[k - 1])}

    def coverage_for(self, target: float) -> dict[str, float] | None:
        """The largest coverage a threshold can reach with balanced accuracy >= ``target`` (``None``: never).

        Only coverages at the end of a group of tied scores are considered (a threshold cannot split a tie).
        """
        ok = np.flatnonzero(self.boundary_balanced_accuracy >= target - 1e-12)
        if not len(ok):
            return None
        j = ok[-1]
        return {"target": float(target), "coverage": float(self.boundaries[j]),
                "balanced_accuracy": float(self.boundary_balanced_accuracy[j]),
                "threshold": float(self.boundary_threshold[j]),
                "referred": round((1 - self.boundaries[j]) * self.n)}  # fmt: skip

    def curve(self, points: int = CURVE_POINTS) -> dict[str, list[float]]:
        """The curve at ``points`` coverages at most (evenly spaced ranks, the last one always kept)."""
        idx = np.unique(np.linspace(0, self.n - 1, min(points, self.n)).round().astype(int)) if self.n else []
        return {"coverage": self.coverage[idx].tolist(), "risk": self.risk[idx].tolist(),
                "balanced_accuracy": self.balanced_accuracy[idx].tolist(),
                "threshold": self.threshold[idx].tolist()}  # fmt: skip

    def summary(self, coverages: Sequence[float] = COVERAGES, targets: Sequence[float] = TARGETS) -> dict[str, Any]:
        """AURC with its random and oracle references, the values at ``coverages`` and the coverage for ``targets``."""
        return {"n": self.n, "aurc": self.aurc, "random_aurc": self.random_aurc, "oracle_aurc": self.oracle_aurc,
                "at_coverage": {f"{c:g}": self.at(c) for c in coverages},
                "coverage_for_balanced_accuracy": {f"{t:g}": self.coverage_for(t) for t in targets}}  # fmt: skip


def _tie_interp(cum: np.ndarray, ends: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Expected cumulative count after ``k`` items when items inside a tie group come in random order."""
    xs = np.concatenate(([0], ends))
    ys = np.concatenate(([0.0], cum[ends - 1]))
    return np.interp(k, xs, ys)


def risk_coverage(labels: np.ndarray, proba: np.ndarray, score: np.ndarray, name: str = "score") -> RiskCoverage:
    """The risk-coverage curve of the labelled patients ranked by ``score`` (most certain first).

    Args:
        labels: (B,) true class, -1 where unknown (left out).
        proba: (B, C) probabilities (the prediction is their arg-max).
        score: (B,) uncertainty (lower = kept first).
        name: the score's name.
    """
    labels = np.asarray(labels, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    known = labels >= 0
    y, p, s = labels[known], proba[known].argmax(axis=1), score[known]
    n, c = len(y), proba.shape[1]
    if n == 0:
        empty = np.zeros(0)
        return RiskCoverage(name, empty, empty, empty, empty, empty, empty, empty)
    order = np.argsort(s, kind="stable")
    y, p, s = y[order], p[order], s[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) + 1  # (G,) exclusive end of each tie group
    k = np.arange(1, n + 1)
    err = _tie_interp(np.cumsum(y != p), ends, k)
    onehot = np.eye(c)[y]  # (n, C)
    hits = onehot * (y == p)[:, None]
    support = np.stack([_tie_interp(np.cumsum(onehot[:, j]), ends, k) for j in range(c)], axis=1)  # (n, C)
    correct = np.stack([_tie_interp(np.cumsum(hits[:, j]), ends, k) for j in range(c)], axis=1)
    ba = _balanced(correct, support)
    exact_support = np.cumsum(onehot, axis=0)[ends - 1]
    exact_correct = np.cumsum(hits, axis=0)[ends - 1]
    return RiskCoverage(name, k / n, err / k, ba, s.copy(), ends / n, _balanced(exact_correct, exact_support),
                        s[ends - 1].copy())  # fmt: skip


def _balanced(correct: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Row-wise mean recall over the classes with support."""
    present = support > 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, correct / np.where(present, support, 1.0), 0.0)
    count = present.sum(axis=1)
    return np.where(count > 0, recall.sum(axis=1) / np.maximum(count, 1), np.nan)


def selective_summary(labels: np.ndarray, proba: np.ndarray, uncertainty: Uncertainty, *,
                      coverages: Sequence[float] = COVERAGES, targets: Sequence[float] = TARGETS,
                      curve_points: int = CURVE_POINTS) -> dict[str, Any]:  # fmt: skip
    """Risk-coverage summaries of every score of ``uncertainty`` on the labelled patients.

    Returns:
        ``{"patients", "scores": {name: summary + "curve"}, "best", "skipped"}`` (``metrics.json["uncertainty"]``);
        ``best`` is the score with the lowest AURC.
    """
    labels = np.asarray(labels)
    out: dict[str, Any] = {"patients": int((labels >= 0).sum()), "scores": {}, "skipped": dict(uncertainty.notes),
                           "mc_samples": uncertainty.mc_samples,
                           "scale": "0 = certain, 1 = maximally uncertain"}  # fmt: skip
    for name in SCORES:
        if name not in uncertainty.scores:
            continue
        rc = risk_coverage(labels, proba, uncertainty.scores[name], name)
        if not rc.n:
            continue
        out["scores"][name] = {**rc.summary(coverages, targets), "curve": rc.curve(curve_points)}
    finite = {k: v["aurc"] for k, v in out["scores"].items() if math.isfinite(v["aurc"])}
    out["best"] = min(finite, key=lambda k: (finite[k], SCORES.index(k))) if finite else None
    return out
