"""Configuration of a continual run (the YAML given to ``milcore continual --config``), validated on load."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feature_cache.errors import InvalidArgumentError, UserError

BALANCES = ("weights", "sampler", "none")


@dataclass(frozen=True)
class StreamTrainConfig:
    """How each task is trained.

    Attributes:
        epochs: epochs per task (fixed: a stream has no validation set to stop on).
        lr: AdamW learning rate (a fresh optimiser per task).
        weight_decay: AdamW weight decay.
        batch_instances: instance budget of one packed batch.
        max_bag_instances: random sub-sampling of larger bags while training (0 = never).
        balance: class imbalance between memory and new data: ``weights`` (inverse-frequency loss
            weights over the task's training items), ``sampler`` (classes drawn equally often) or ``none``.
        grad_clip: max gradient norm (0 = off).
        standardize: standardise features with the first task's training cells (mean/std, then frozen).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """

    epochs: int = 30
    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_instances: int = 4096
    max_bag_instances: int = 0
    balance: str = "weights"
    grad_clip: float = 5.0
    standardize: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"train.lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}"),
            (self.batch_instances >= 1, f"train.batch_instances must be >= 1, got {self.batch_instances}"),
            (self.max_bag_instances >= 0, f"train.max_bag_instances must be >= 0, got {self.max_bag_instances}"),
            (self.balance in BALANCES, f"train.balance must be one of {', '.join(BALANCES)}, got {self.balance!r}"),
            (self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)


@dataclass(frozen=True)
class ContinualConfig:
    """A continual experiment.

    Attributes:
        name: experiment name.
        data: ``bank`` + ``cohort`` (+ ``label``, optional ``classes``), or ``synthetic`` (cohorts to
            generate and extract, see :mod:`milcore.continual.prepare`) + ``label``.
        scenario: the scenario mapping (:func:`milcore.continual.scenarios.build_scenario`).
        model: ``name`` (registered aggregator) and ``args``.
        train: :class:`StreamTrainConfig`.
        memory: ``budget`` (instances) and ``per_bag`` (target instances per stored bag).
        strategies: strategy name -> options, run in this order.
        seeds: training seeds (the scenario's hold-out split is fixed by ``scenario.seed``).
    """

    name: str
    data: dict[str, Any]
    scenario: dict[str, Any]
    model: dict[str, Any] = field(default_factory=lambda: {"name": "abmil", "args": {}})
    train: StreamTrainConfig = field(default_factory=StreamTrainConfig)
    memory: dict[str, int] = field(default_factory=lambda: {"budget": 5000, "per_bag": 32})
    strategies: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (JSON/YAML)."""
        return dataclasses.asdict(self)

    @property
    def budget(self) -> int:
        """Memory budget in instances."""
        return int(self.memory.get("budget", 5000))

    @property
    def per_bag(self) -> int:
        """Target instances per stored bag."""
        return int(self.memory.get("per_bag", 32))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ContinualConfig:
        """Validate a mapping; errors name ``source`` and the bad key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
        for key in ("data", "scenario", "strategies"):
            if not isinstance(raw.get(key), dict) or (not raw.get(key) and key != "data"):
                raise UserError(f"{source}: '{key}' must be a non-empty mapping")
        train_raw = raw.get("train") or {}
        names = {f.name for f in dataclasses.fields(StreamTrainConfig)}
        bad = sorted(set(train_raw) - names)
        if bad:
            raise UserError(f"{source}: unknown train option(s) {', '.join(bad)} (valid: {', '.join(sorted(names))})")
        memory = {"budget": 5000, "per_bag": 32, **(raw.get("memory") or {})}
        if set(memory) - {"budget", "per_bag"}:
            raise UserError(f"{source}: memory takes 'budget' and 'per_bag' only")
        if int(memory["budget"]) < 1 or int(memory["per_bag"]) < 1:
            raise UserError(f"{source}: memory budget and per_bag must be >= 1 instance")
        if not seeds_ok(raw.get("seeds", [0])):
            raise UserError(f"{source}: seeds must be a list of non-negative integers")
        strategies = {str(k): dict(v or {}) for k, v in raw["strategies"].items()}
        seeds = raw.get("seeds", [0])
        seeds = tuple(int(s) for s in (seeds if isinstance(seeds, list) else [seeds]))
        model = raw.get("model") or {"name": "abmil"}
        try:
            train = StreamTrainConfig(**train_raw)
        except InvalidArgumentError as exc:
            raise UserError(f"{source}: {exc}") from exc
        return cls(name=str(raw.get("name", "continual")), data=dict(raw["data"]), scenario=dict(raw["scenario"]),
                   model={"name": str(model.get("name", "abmil")), "args": dict(model.get("args") or {})},
                   train=train, memory={k: int(v) for k, v in memory.items()}, strategies=strategies,
                   seeds=seeds)  # fmt: skip


def seeds_ok(seeds: Any) -> bool:
    """Whether ``seeds`` is an int or a list of non-negative ints."""
    values = seeds if isinstance(seeds, list) else [seeds]
    return bool(values) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in values)


def load_config(path: str | Path) -> ContinualConfig:
    """Read and validate a YAML configuration.

    Raises:
        UserError: missing or unreadable file, unknown keys, bad values (naming the file).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: configuration not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not a readable YAML file ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return ContinualConfig.from_dict(raw, source=str(path))
