"""Training configuration: one frozen dataclass, resolved and saved with every run."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feature_cache.errors import InvalidArgumentError

OPTIMIZERS = ("adamw", "sgd")
WEIGHTINGS = ("balanced", "none")
SAMPLERS = ("shuffle", "balanced")
MONITORS = ("val_loss", "val_balanced_accuracy")
INPUT_NORMS = ("none", "standardize")

#: Field annotation -> (accepted Python types, how a message names them). ``bool`` is refused where a
#: number is expected (YAML reads ``yes`` as true).
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((numbers.Integral,), "a whole number"),
    "float": ((numbers.Real,), "a number"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "dict[str, Any]": ((dict,), "a mapping"),
}

#: Top-level keys of a run's ``config.yaml`` besides ``train``: it may be given as ``--config`` to train
#: again with its options; these keys record the run and are not options.
RUN_RECORD_KEYS = ("run", "inputs", "classes", "encoder", "versions", "join")


@dataclass(frozen=True)
class TrainConfig:
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
        amp: ``auto`` (bfloat16 autocast on CUDA, off on CPU), ``bf16``, ``fp16`` or ``off``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: random seed (weights, batching, sub-sampling).
        memory_budget_gb: bags whose features fit this budget are held in memory; otherwise they are
            streamed from the bank by DataLoader workers collating whole batches.
        num_workers: DataLoader workers when streaming.
        deterministic: request deterministic algorithms (slower on CUDA).
        tensorboard: also log per-epoch losses and validation metrics for TensorBoard (needs the
            optional ``tensorboard`` package); CSV/JSON histories are always written.
    """

    model: str = "abmil"
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 40
    lr: float = 5e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    batch_instances: int = 2048
    max_bag_instances: int = 4096
    instance_dropout: float = 0.0
    input_norm: str = "none"
    class_weighting: str = "balanced"
    sampler: str = "shuffle"
    bel_weight: float = 0.0
    grad_clip: float = 5.0
    patience: int = 10
    min_epochs: int = 5
    monitor: str = "val_loss"
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    memory_budget_gb: float = 4.0
    num_workers: int = 2
    deterministic: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        """Validate every field; raises :class:`InvalidArgumentError` naming the bad one."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            types, kind = _KINDS[str(f.type)]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise InvalidArgumentError(f"{f.name} must be {kind}, got {value!r}")
            if isinstance(value, numbers.Real) and not math.isfinite(value):
                raise InvalidArgumentError(f"{f.name} must be a finite number, got {value!r}")
        if any(not isinstance(k, str) for k in self.model_args):
            raise InvalidArgumentError(f"model_args keys must be names, got {list(self.model_args)!r}")
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.batch_instances >= 1, f"batch_instances must be >= 1, got {self.batch_instances}"),
            (self.max_bag_instances >= 0, f"max_bag_instances must be >= 0, got {self.max_bag_instances}"),
            (0 <= self.instance_dropout < 1, f"instance_dropout must be in [0, 1), got {self.instance_dropout}"),
            (self.input_norm in INPUT_NORMS, f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}"),
            (self.class_weighting in WEIGHTINGS, f"class_weighting must be one of {WEIGHTINGS}"),
            (self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {self.sampler!r}"),
            (self.bel_weight >= 0, f"bel_weight must be >= 0, got {self.bel_weight}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.monitor in MONITORS, f"monitor must be one of {MONITORS}, got {self.monitor!r}"),
            (self.amp in ("auto", "bf16", "fp16", "off"), f"amp must be auto, bf16, fp16 or off, got {self.amp!r}"),
            (self.memory_budget_gb >= 0, "memory_budget_gb must be >= 0"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (isinstance(self.model_args, dict), "model_args must be a mapping"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)

    def to_dict(self) -> dict[str, Any]:
        """A plain dictionary (for YAML/JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys with close matches and the list of valid ones."""
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"training options must be a mapping, got {type(data).__name__}")
        names = sorted(f.name for f in dataclasses.fields(cls))
        unknown = [str(k) for k in data if k not in names]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
                hints.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise InvalidArgumentError(f"unknown training option(s) {', '.join(hints)} (valid: {', '.join(names)})")
        return cls(**data)


def options_from_file(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The ``train:`` options of a parsed YAML file, each key and value checked, errors naming the file.

    The file holds a ``train:`` mapping of :class:`TrainConfig` fields; a run folder's ``config.yaml``
    is accepted too (its :data:`RUN_RECORD_KEYS` describe the run and are not options).

    Raises:
        InvalidArgumentError: an unknown top-level key, ``train`` not a mapping, an unknown option or
            a bad value; the message starts with the file's path.
    """
    allowed = ("train", *RUN_RECORD_KEYS)
    unknown = [str(k) for k in data if k not in allowed]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hints.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise InvalidArgumentError(f"{path}: unknown top-level key(s) {', '.join(hints)}; training options go "
                                   "under 'train:'")  # fmt: skip
    options = data.get("train")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidArgumentError(f"{path}: 'train' must be a mapping of training options, got "
                                   f"{type(options).__name__}")  # fmt: skip
    try:
        TrainConfig.from_dict(options)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{path}: train: {exc}") from None
    return dict(options)
