"""Training configuration: what a run trains on (:class:`RunSpec`) and how (:class:`TrainConfig`).

Both follow the engine's config convention (:mod:`feature_cache.config`): frozen, built the same way
from Python, from a YAML ``train:`` mapping (``from_dict``) and from ``milcore train`` flags derived
from the fields, every bad value an :class:`~feature_cache.errors.InvalidArgumentError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feature_cache.config import Config, check_keys, option
from feature_cache.errors import InvalidArgumentError

OPTIMIZERS = ("adamw", "sgd")
WEIGHTINGS = ("balanced", "none")
SAMPLERS = ("shuffle", "balanced")
MONITORS = ("val_loss", "val_balanced_accuracy")
INPUT_NORMS = ("none", "standardize")
AMP_MODES = ("auto", "native", "bf16", "fp16", "off")

#: Top-level keys of a run's ``config.yaml`` besides ``train``: it may be given as ``--config`` to train
#: again with its options; these keys record the run and are not options.
RUN_RECORD_KEYS = ("run", "inputs", "classes", "encoder", "versions", "join")


#: ``TrainConfig`` fields that say where and how fast a run computes, not what it learns: they may change on
#: ``--resume`` and differ between the parts of a job array (``report merge``).
PLACEMENT_OPTIONS = ("device", "num_workers", "memory_budget_gb", "tensorboard")


@dataclass(frozen=True)
class TrainConfig(Config):
    """How one bag classifier is trained.

    Attributes:
        model: registered aggregator name (``milcore.models.list_aggregators()``).
        model_args: overrides of the aggregator's config (e.g. ``{"hidden_dim": 256}``).
        epochs: maximum epochs.
        lr: learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9).
        batch_instances: instance budget of one optimisation step: many small bags or a few large
            ones are packed until their cells reach this number (a bag larger than it is a batch alone).
        max_bag_instances: training-time random sub-sampling of huge bags (0 = never); evaluation
            always sees every cell.
        instance_dropout: fraction of each training bag's cells left out at random at every step (an
            augmentation against memorising a few bags; 0 = off); evaluation always sees every cell.
        input_norm: ``standardize`` (every feature shifted and scaled by the training fold's cell mean and
            standard deviation, stored in the model and applied wherever it is used) or ``none``.
        class_weighting: ``balanced`` (inverse class frequency in the loss) or ``none``.
        sampler: ``shuffle`` (every bag once per epoch) or ``balanced`` (classes drawn equally often).
        bel_weight: weight of the Bag Embedding Loss (0 = off).
        grad_clip: max gradient norm (0 = off).
        patience: epochs without validation improvement before stopping.
        min_epochs: never stop before this epoch.
        monitor: validation quantity for early stopping and best-epoch selection.
        amp: ``auto`` (bfloat16 autocast on CUDA, off on CPU), ``native`` (bfloat16 wherever the device
            computes it natively: CUDA, or a CPU with AVX512-BF16 or AMX; full precision elsewhere),
            ``bf16``, ``fp16`` or ``off``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: random seed (weights, batching, sub-sampling).
        memory_budget_gb: bags whose features fit this budget are held in memory; otherwise they are
            streamed from the bank by DataLoader workers collating whole batches.
        num_workers: DataLoader workers when streaming.
        deterministic: request deterministic algorithms (slower on CUDA).
        tensorboard: also log per-epoch losses and validation metrics for TensorBoard (needs the
            optional ``tensorboard`` package); CSV/JSON histories are always written.
    """

    config_key = "training option"

    model: str = "abmil"
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = option(40, low=1)
    lr: float = option(5e-4, low=0, low_open=True)
    weight_decay: float = option(1e-4, low=0)
    optimizer: str = option("adamw", choices=OPTIMIZERS)
    batch_instances: int = option(2048, low=1)
    max_bag_instances: int = option(4096, low=0)
    instance_dropout: float = option(0.0, low=0, high=1, high_open=True)
    input_norm: str = option("none", choices=INPUT_NORMS)
    class_weighting: str = option("balanced", choices=WEIGHTINGS)
    sampler: str = option("shuffle", choices=SAMPLERS)
    bel_weight: float = option(0.0, low=0)
    grad_clip: float = option(5.0, low=0)
    patience: int = option(10, low=1)
    min_epochs: int = option(5, low=0)
    monitor: str = option("val_loss", choices=MONITORS)
    amp: str = option("auto", choices=AMP_MODES)
    device: str = "auto"
    seed: int = option(0, low=0)
    memory_budget_gb: float = option(4.0, low=0)
    num_workers: int = option(2, low=0)
    deterministic: bool = True
    tensorboard: bool = False


@dataclass(frozen=True)
class RunSpec(Config):
    """What a cross-validated run trains on.

    Attributes:
        bank: feature bank path.
        cohort: cohort table path.
        task: label column.
        folds: number of cross-validation folds.
        seed: split seed (the training seed is in :class:`TrainConfig`).
        cells: instance ground-truth table; ``None`` looks for ``cells.csv`` beside the cohort.
        group_column: cohort column grouping several bags of one patient.
        n_boot: bootstrap resamples for confidence intervals.
    """

    bank: str
    cohort: str
    task: str
    folds: int = option(5, low=3)
    seed: int = option(0, low=0)
    cells: str | None = None
    group_column: str = "patient"
    n_boot: int = option(1000, low=10)


def options_from_file(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The ``train:`` options of a parsed YAML file, each key and value checked, errors naming the file.

    The file holds a ``train:`` mapping of :class:`TrainConfig` fields; a run folder's ``config.yaml``
    is accepted too (its :data:`RUN_RECORD_KEYS` describe the run and are not options).

    Raises:
        InvalidArgumentError: an unknown top-level key, ``train`` not a mapping, an unknown option or
            a bad value; the message starts with the file's path.
    """
    try:
        check_keys(data, ("train", *RUN_RECORD_KEYS), "top-level key")
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{path}: {exc}; training options go under 'train:'") from None
    options = data.get("train")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidArgumentError(f"{path}: 'train' must be a mapping of training options, got "
                                   f"{type(options).__name__}")  # fmt: skip
    TrainConfig.from_dict(options, where=f"{path}: train")
    return dict(options)
