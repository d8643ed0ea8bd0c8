"""What ``milcore bench aggregators`` (and the suites built on it) benchmarks: :class:`BenchSpec`.

Follows the engine's config convention (:mod:`feature_cache.config`); ``milcore bench`` derives its
flags from these fields and from :data:`BENCH_TRAIN`, so each default is declared here once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from feature_cache.config import Config, option
from feature_cache.errors import InvalidArgumentError, UserError
from milcore.bench import DEFAULT_PEERS
from milcore.training.config import TrainConfig

#: Training defaults of a benchmark (shorter than a cross-validated run's: every model x fold x seed is
#: trained); ``BenchSpec.train`` and the ``milcore bench`` flags start from these. ``amp="native"``:
#: bfloat16 autocast where the device computes it natively (a CPU with AVX512-BF16 or AMX, CUDA), full
#: precision elsewhere (``benchmarks/README.md``, "Full benchmark speed", for what it buys and costs).
BENCH_TRAIN = TrainConfig(epochs=20, patience=5, amp="native")
#: Every registered aggregator (``--models`` takes names and ``fnmatch`` patterns).
ALL_MODELS = ("*",)


def _scalar_metrics() -> tuple[str, ...]:
    """The metrics a trial can optimise (the metric table's scalar ones; imported when first needed)."""
    from milcore.metrics import SCALAR_METRICS

    return SCALAR_METRICS


@dataclass(frozen=True)
class TuneSpec(Config):
    """Equal tuning budgets (:mod:`milcore.bench.tune`): nested patient-level CV with Optuna.

    Attributes:
        trials: Optuna trials per model and outer fold (0: no tuning); the first trial is the model's
            defaults, so a tuned model is the default one unless another setting scored better.
        inner_folds: patient-level folds made inside each outer fold's training + validation bags.
        metric: what a trial maximises (or minimises, for a lower-is-better metric): the metric of the
            pooled out-of-fold predictions of the inner folds.
        prune: stop a trial after an inner fold when its running score is below the median of the
            earlier trials at that fold (Optuna's ``MedianPruner``, after the first 5 trials).
        min_gain: a trial replaces the defaults only when its inner-CV score beats theirs by at least this
            much (0: any better score; a small margin keeps selection noise from replacing the defaults).
        min_gain_se: ... and by at least this many standard errors of that gain (a paired bootstrap of the
            pooled inner out-of-fold predictions, patients resampled within each class:
            :func:`milcore.metrics.intervals.bootstrap_gain`); 1 is the one-standard-error rule, 0 turns
            the check off. The best of N trials beats the defaults by chance alone more often the larger N
            and the noisier the inner CV; this keeps such a win from replacing them.
        confirm: a trial that passes both checks is confirmed before it replaces the defaults: it and the
            defaults are trained again on fresh inner folds (another patient split and training seed) and it
            must pass the same two checks there. Its first gain is the largest of ``trials`` noisy scores (the
            winner's curse); the second is measured on draws it was not selected on. Off by default: measured
            on two cohorts it kept the defaults far more often (fewer tuned results below their defaults) but
            lowered the tuned results' means on both (``benchmarks/README.md``, "Confirmation on fresh inner
            folds").
        search: restrictions of the search space, ``{"[model.]key": "value" | "low:high" | "a,b,c"}``;
            every value must lie inside the model's declared space (or the shared one).
    """

    config_key = "tuning option"

    trials: int = option(0, low=0)
    inner_folds: int = option(3, low=3)
    metric: str = option("auroc", choices=_scalar_metrics)
    prune: bool = True
    min_gain: float = option(0.01, low=0)
    min_gain_se: float = option(1.0, low=0)
    confirm: bool = False
    search: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchSpec(Config):
    """What to benchmark.

    Attributes:
        bank: feature bank path.
        cohort: cohort table path.
        task: label column.
        models: our aggregator names or ``fnmatch`` patterns (default ``*``: every registered aggregator,
            ``milcore.models.list_aggregators()``).
        peers: torchmil models to run beside them (``milcore.bench.PEER_MODELS``).
        folds: cross-validation folds.
        seeds: each seed gives its own splits, weights and batching (shared by all models).
        fold: run only this outer fold (0 .. ``folds`` - 1) of every seed, e.g. one task of a job array;
            ``None``: every fold. The folds are made as the whole benchmark makes them, so the parts of a
            job array joined by :func:`milcore.bench.merge.merge_benches` (``milcore report merge``) give
            the whole benchmark.
        train: training settings (``model`` and ``seed`` are set per run; ``model_args`` apply to every
            model, so leave them empty unless every model has those fields).
        tune: tuning budget (``trials`` 0: default settings only).
        workers: worker processes training runs in parallel, one torch thread each (0: one per available
            CPU core; 1: everything in this process). Rows do not depend on it.
        ood_site: a value of ``site_column`` whose bags are held out of CV and predicted by every fold model.
        site_column: cohort column holding the acquisition site.
        cells: instance ground truth; ``None`` looks for ``cells.csv`` beside the cohort.
        group_column: cohort column grouping several bags of one patient.
    """

    config_key = "benchmark option"

    bank: str
    cohort: str
    task: str
    models: tuple[str, ...] = ALL_MODELS
    peers: tuple[str, ...] = DEFAULT_PEERS
    folds: int = option(5, low=3)
    seeds: tuple[int, ...] = option((0, 1, 2), low=0, min_items=1)
    fold: int | None = None
    train: TrainConfig = field(default_factory=lambda: BENCH_TRAIN)
    tune: TuneSpec = field(default_factory=TuneSpec)
    workers: int = option(0, low=0)
    ood_site: str | None = None
    site_column: str = "site"
    cells: str | None = None
    group_column: str = "patient"


def check_fold(spec: BenchSpec) -> None:
    """Raise :class:`InvalidArgumentError` when ``spec.fold`` is not one of the ``spec.folds`` folds (the wording
    of ``milcore train --fold``)."""
    if spec.fold is not None and not 0 <= spec.fold < spec.folds:
        raise InvalidArgumentError(f"--fold {spec.fold}: out of range, --folds {spec.folds} has folds 0 to "
                                   f"{spec.folds - 1}")  # fmt: skip


def expand_models(models: tuple[str, ...], where: str = "--models") -> tuple[str, ...]:
    """Names and ``fnmatch`` patterns -> registered aggregator names, in the order given (each once).

    Raises:
        UserError: a pattern that matches no registered aggregator (a plain unknown name is left for
            :func:`milcore.bench.aggregators.check_models`, which suggests close matches).
    """
    from milcore.models import list_aggregators

    out: list[str] = []
    for name in models:
        if any(c in name for c in "*?["):
            found = [n for n in list_aggregators() if fnmatch.fnmatchcase(n, name)]
            if not found:
                raise UserError(f"{where}: no registered aggregator matches {name!r} "
                                f"(registered: {', '.join(list_aggregators())})")  # fmt: skip
            out += found
        else:
            out.append(name)
    return tuple(dict.fromkeys(out))
