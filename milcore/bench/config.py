"""What ``milcore bench aggregators`` (and the suites built on it) benchmarks: :class:`BenchSpec`.

Follows the engine's config convention (:mod:`feature_cache.config`); ``milcore bench`` derives its
flags from these fields and from :data:`BENCH_TRAIN`, so each default is declared here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from feature_cache.config import Config, option
from milcore.bench import DEFAULT_MODELS, DEFAULT_PEERS
from milcore.training.config import TrainConfig

#: Training defaults of a benchmark (shorter than a cross-validated run's: every model x fold x seed is
#: trained); ``BenchSpec.train`` and the ``milcore bench`` flags start from these.
BENCH_TRAIN = TrainConfig(epochs=20, patience=5)


@dataclass(frozen=True)
class BenchSpec(Config):
    """What to benchmark.

    Attributes:
        bank: feature bank path.
        cohort: cohort table path.
        task: label column.
        models: our aggregator names (``milcore.models.list_aggregators()``).
        peers: torchmil models to run beside them (``abmil``, ``transmil``, ``dsmil``).
        folds: cross-validation folds.
        seeds: each seed gives its own splits, weights and batching (shared by all models).
        train: training settings (``model`` and ``seed`` are set per run; ``model_args`` apply to every
            model, so leave them empty unless every model has those fields).
        ood_site: a value of ``site_column`` whose bags are held out of CV and predicted by every fold model.
        site_column: cohort column holding the acquisition site.
        cells: instance ground truth; ``None`` looks for ``cells.csv`` beside the cohort.
        group_column: cohort column grouping several bags of one patient.
    """

    config_key = "benchmark option"

    bank: str
    cohort: str
    task: str
    models: tuple[str, ...] = DEFAULT_MODELS
    peers: tuple[str, ...] = DEFAULT_PEERS
    folds: int = option(5, low=3)
    seeds: tuple[int, ...] = option((0, 1, 2), low=0, min_items=1)
    train: TrainConfig = field(default_factory=lambda: BENCH_TRAIN)
    ood_site: str | None = None
    site_column: str = "site"
    cells: str | None = None
    group_column: str = "patient"
