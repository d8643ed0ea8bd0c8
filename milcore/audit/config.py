"""What an audit computes (:class:`AuditConfig`) and what an imbalance experiment re-trains (:class:`ExperimentSpec`).

Both follow the engine's config convention (:mod:`feature_cache.config`); ``milcore audit`` and
``milcore audit experiment`` derive their flags (types, ranges, defaults, help) from these fields.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from feature_cache.config import Config, option
from feature_cache.errors import InvalidArgumentError
from milcore.training.config import TrainConfig

#: Default age bands (inclusive years). The 72-86 band is the one Sadafi et al. (2023, "A Study of Age and
#: Sex Bias in Multiple Instance Learning based Classification of AML Subtypes") found hurt by an age
#: bias; the other cut points split the adult range into bands of similar width.
DEFAULT_AGE_BANDS: tuple[tuple[int, int], ...] = ((0, 45), (46, 59), (60, 71), (72, 86), (87, 130))
ATTRIBUTES = ("sex", "age", "site")
CORRECTIONS = ("holm", "bonferroni", "bh", "westfall-young")
#: How the primary family's alpha is shared among its tests (``AuditConfig.primary_weights``).
PRIMARY_WEIGHTS = ("tests", "attributes")
#: What a gap test looks for: the group worse than the rest (one-sided: a flag is a claim that a group is
#: worse), or a difference either way (two-sided, the test before issue 19).
ALTERNATIVES = ("worse", "two-sided")


def _metrics() -> tuple[str, ...]:
    """The metrics an audit can test per group (the metric table's group-weighted ones)."""
    from milcore.metrics.table import GROUP_METRICS

    return GROUP_METRICS


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


def _load_age_bands(value: Any) -> Any:
    """``"0-45,46-59"``, ``["0-45", "46-59"]`` (as ``to_dict`` writes them) or ``[[0, 45], [46, 59]]``."""
    if isinstance(value, str):
        return parse_age_bands(value)
    if isinstance(value, (list, tuple)):
        return tuple(parse_age_bands(v)[0] if isinstance(v, str) else v for v in value)
    return value


def _dump_age_bands(bands: tuple[tuple[int, int], ...]) -> list[str]:
    return [f"{lo}-{hi}" for lo, hi in bands]


@dataclass(frozen=True)
class AuditConfig(Config):
    """How a run's predictions are stratified and tested.

    Attributes:
        attributes: cohort columns to stratify by (``sex``, ``age`` in bands, ``site``); missing ones are
            reported and skipped.
        age_bands: inclusive ``(low, high)`` year ranges (``"0-45,46-59"`` in a file or on the command line).
        intersections: also audit every pair of attributes (e.g. female x 72-86).
        min_group_size: groups with fewer patients are reported as ``insufficient`` and not tested.
        primary_metrics: the metrics whose gaps on single-attribute groups form the primary family of tests
            (each group tested on each of them, all on the same permutations; a group is flagged when any of its
            tests is). The default pairs the class-balanced true-class log-odds (most powerful where a bias lowers
            the model's confidence in the true class) with balanced accuracy (as powerful as anything where a bias
            only flips answers); Westfall-Young pays little for the pair because a group's two statistics are
            strongly dependent. Chosen by measured power: benchmarks/README.md, "Issue 19, round 3".
        primary_attributes: the attributes whose groups form the primary family (empty: every audited one);
            the others' groups join the secondary family. Pre-specifying the question (e.g. ``sex``) makes
            a smaller family, which finds smaller gaps.
        test_metrics: the metrics whose gaps are tested; with the per-class recall and FPR
            (``per_class=True``) and every intersection they form the secondary family.
        per_class: also test per-class recall (TPR) and FPR gaps.
        alpha: family-wise significance level of each family.
        correction: multiple-comparison correction within each family: ``westfall-young`` (step-down min-P
            on permutations shared by every test of the primary family, which accounts for their dependence:
            never less power than Holm; the secondary family then gets Holm), ``holm``, ``bonferroni`` or ``bh``
            (Benjamini-Hochberg FDR). Chosen by measured power: benchmarks/README.md, "Bias audits".
        primary_weights: how the primary family's alpha is shared: ``attributes`` equally among the audited
            attributes and then among each attribute's tests (each attribute is one question: cutting age into
            more bands does not dilute the sex tests; a little less power per age band), ``tests`` equally
            among its tests (weighted Holm / Westfall-Young).
        alternative: ``worse`` tests whether each group is worse than the rest (one-sided; both groups of a
            two-valued attribute are tests of the family), ``two-sided`` whether it differs either way.
        permute_within_class: shuffle group membership within each true class, so every permutation keeps the
            group's class mix (False: over all patients, the test before issue 19).
        mde_power: power of the minimum detectable effect reported beside every verdict.
        n_boot: bootstrap resamples for confidence intervals (patients resampled within groups).
        n_perm: permutations per gap test.
        n_bins: confidence bins of the calibration error.
        seed: seed of the resampling.
    """

    config_key = "audit option"

    attributes: tuple[str, ...] = option(ATTRIBUTES, choices=ATTRIBUTES)
    age_bands: tuple[tuple[int, int], ...] = option(DEFAULT_AGE_BANDS, min_items=1, load=_load_age_bands,
                                                    dump=_dump_age_bands)  # fmt: skip
    intersections: bool = True
    min_group_size: int = option(10, low=2)
    primary_metrics: tuple[str, ...] = option(("balanced_log_odds", "balanced_accuracy"), choices=_metrics,
                                              min_items=1)  # fmt: skip
    primary_attributes: tuple[str, ...] = option((), choices=ATTRIBUTES)
    test_metrics: tuple[str, ...] = option(("balanced_accuracy", "balanced_brier", "balanced_log_loss", "macro_f1",
                                            "auroc", "ece"), choices=_metrics)  # fmt: skip
    per_class: bool = True
    alpha: float = option(0.05, low=0, high=1, low_open=True, high_open=True)
    correction: str = option("westfall-young", choices=CORRECTIONS)
    primary_weights: str = option("attributes", choices=PRIMARY_WEIGHTS)
    alternative: str = option("worse", choices=ALTERNATIVES)
    permute_within_class: bool = True
    mde_power: float = option(0.8, low=0, high=1, low_open=True, high_open=True)
    n_boot: int = option(1000, low=10)
    n_perm: int = option(2000, low=10)
    n_bins: int = option(10, low=1)
    seed: int = option(0, low=0)

    def validate(self) -> None:
        """Age bands are non-empty and do not overlap; primary attributes are audited."""
        extra = [a for a in self.primary_attributes if a not in self.attributes]
        if extra:
            raise InvalidArgumentError(f"primary_attributes: {', '.join(extra)} not among the audited attributes "
                                       f"({', '.join(self.attributes)})")  # fmt: skip
        for lo, hi in self.age_bands:
            if lo > hi:
                raise InvalidArgumentError(f"age_bands: band {lo}-{hi} is empty")
        for (_, hi), (lo, _) in itertools.pairwise(sorted(self.age_bands)):
            if lo <= hi:
                raise InvalidArgumentError(f"age_bands: bands overlap at {lo}")


#: Training defaults of the imbalance experiment (shorter than a cross-validated run's: it re-trains
#: fractions x seeds times); ``ExperimentSpec.train`` and ``milcore audit experiment`` start from these.
EXPERIMENT_TRAIN = TrainConfig(epochs=30, patience=8, num_workers=0)


@dataclass(frozen=True)
class ExperimentSpec(Config):
    """What an imbalance experiment re-trains and how.

    Attributes:
        bank: feature bank path.
        cohort: cohort table path (label, ``sex`` and ``age`` columns).
        task: label column.
        fractions: female fractions of the training set.
        seeds: repetitions per condition (seed of the training-set draw and of the weights).
        train_size: training patients per condition (validation split included); 0 = the largest size
            every condition can reach.
        test_fraction: share of each class x sex stratum held out as the fixed test set.
        val_fraction: share of each drawn training set used for early stopping and temperature scaling.
        age: run the age-band exclusion experiment too.
        train: how each model is trained (``model``, ``model_args``, epochs, ...; ``seed`` is set per
            training).
    """

    config_key = "experiment option"

    bank: str
    cohort: str
    task: str
    fractions: tuple[float, ...] = option((0.0, 0.25, 0.5, 0.75, 1.0), low=0, high=1, min_items=1)
    seeds: int = option(3, low=1)
    train_size: int = option(0, low=0)
    test_fraction: float = option(0.3, low=0, high=1, low_open=True, high_open=True)
    val_fraction: float = option(0.2, low=0, high=1, low_open=True, high_open=True)
    age: bool = True
    train: TrainConfig = field(default_factory=lambda: EXPERIMENT_TRAIN)
