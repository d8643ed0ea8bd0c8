"""What an audit computes: subgroup definitions, the tested metrics, resampling and the significance rule."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from feature_cache.errors import InvalidArgumentError

#: Default age bands (inclusive years). The 72-86 band is the one Sadafi et al. (2023, "A Study of Age and
#: Sex Bias in Multiple Instance Learning based Classification of AML Subtypes") found hurt by an age
#: bias; the other cut points split the adult range into bands of similar width.
DEFAULT_AGE_BANDS: tuple[tuple[int, int], ...] = ((0, 45), (46, 59), (60, 71), (72, 86), (87, 130))
ATTRIBUTES = ("sex", "age", "site")
CORRECTIONS = ("holm", "bonferroni", "bh")


@dataclass(frozen=True)
class AuditConfig:
    """How a run's predictions are stratified and tested.

    Attributes:
        attributes: cohort columns to stratify by (``sex``, ``age`` in bands, ``site``); missing ones are
            reported and skipped.
        age_bands: inclusive ``(low, high)`` year ranges.
        intersections: also audit every pair of attributes (e.g. female x 72-86).
        min_group_size: groups with fewer patients are reported as ``insufficient`` and not tested.
        primary_metric: the metric whose gaps on single-attribute groups form the primary family of tests.
        test_metrics: the metrics whose gaps are tested; with the per-class recall and FPR
            (``per_class=True``) and every intersection they form the secondary family.
        per_class: also test per-class recall (TPR) and FPR gaps.
        alpha: family-wise significance level of each family.
        correction: ``holm`` (default), ``bonferroni`` or ``bh`` (Benjamini-Hochberg FDR).
        n_boot: bootstrap resamples for confidence intervals (patients resampled within groups).
        n_perm: permutations per gap test.
        n_bins: confidence bins of the calibration error.
        seed: seed of the resampling.
    """

    attributes: tuple[str, ...] = ATTRIBUTES
    age_bands: tuple[tuple[int, int], ...] = DEFAULT_AGE_BANDS
    intersections: bool = True
    min_group_size: int = 10
    primary_metric: str = "balanced_accuracy"
    test_metrics: tuple[str, ...] = ("balanced_accuracy", "macro_f1", "auroc", "ece")
    per_class: bool = True
    alpha: float = 0.05
    correction: str = "holm"
    n_boot: int = 1000
    n_perm: int = 2000
    n_bins: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate; raises :class:`InvalidArgumentError` naming the bad value."""
        from milcore.audit.fairness_metrics import HIGHER_IS_BETTER

        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown:
            raise InvalidArgumentError(f"unknown audit attribute(s) {', '.join(unknown)} (use {', '.join(ATTRIBUTES)})")
        for lo, hi in self.age_bands:
            if lo > hi:
                raise InvalidArgumentError(f"age band {lo}-{hi} is empty")
        bands = sorted(self.age_bands)
        for (_, hi), (lo, _) in itertools.pairwise(bands):
            if lo <= hi:
                raise InvalidArgumentError(f"age bands overlap at {lo}")
        bad = [m for m in (self.primary_metric, *self.test_metrics) if m not in HIGHER_IS_BETTER]
        if bad:
            raise InvalidArgumentError(f"unknown metric(s) {', '.join(bad)} (use {', '.join(HIGHER_IS_BETTER)})")
        checks = [
            (self.min_group_size >= 2, f"min_group_size must be >= 2, got {self.min_group_size}"),
            (0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}"),
            (self.correction in CORRECTIONS, f"correction must be one of {', '.join(CORRECTIONS)}"),
            (self.n_boot >= 10, f"n_boot must be >= 10, got {self.n_boot}"),
            (self.n_perm >= 10, f"n_perm must be >= 10, got {self.n_perm}"),
            (self.n_bins >= 1, f"n_bins must be >= 1, got {self.n_bins}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        out = dataclasses.asdict(self)
        out["age_bands"] = [f"{lo}-{hi}" for lo, hi in self.age_bands]
        return out


def parse_age_bands(text: str) -> tuple[tuple[int, int], ...]:
    """``"0-45,46-59,60-71,72-86,87-130"`` -> ((0, 45), ...); raises InvalidArgumentError when malformed."""
    bands = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            if not sep:
                raise ValueError
            bands.append((int(lo), int(hi)))
        except ValueError:
            raise InvalidArgumentError(
                f"age band {part.strip()!r}: expected LOW-HIGH in whole years, e.g. 72-86"
            ) from None
    if not bands:
        raise InvalidArgumentError("no age bands given")
    return tuple(bands)
