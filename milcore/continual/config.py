"""Configuration of a continual run (the YAML given to ``milcore continual --config``), validated on load.

One :class:`ContinualConfig` of nested configs, each following the engine's config convention
(:mod:`feature_cache.config`)::

    name: continual_class_incremental
    data: {bank: bank.h5, cohort: cohort.csv, label: diagnosis}     # ContinualData (or synthetic: ...)
    scenario: {kind: class_incremental, tasks: [[control, ALL], [NPM1, "PML::RARA"]]}   # ScenarioConfig
    model: abmil                                                     # as in TrainConfig
    model_args: {embed_dim: 64}
    train: {epochs: 30, lr: 0.001}                                   # StreamTrainConfig
    memory: {budget: 5000, per_bag: 16}                              # MemoryConfig
    strategies: {finetune: {}, milreplay_ranked: {strategy: milreplay, random_share: 0.0}}   # StrategyConfig
    seeds: [0, 1, 2]

Every key and value is checked when the file is read (unknown keys with the closest valid name), before
any data is prepared. Files written before the convention name the model ``model: {name: abmil, args:
{...}}``; that form is still read (a run folder's ``config.yaml`` may hold it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feature_cache.config import Config, check_keys, option
from feature_cache.errors import InvalidArgumentError

BALANCES = ("weights", "sampler", "none")
#: Scenario kinds (:mod:`milcore.continual.scenarios`).
KINDS = ("class_incremental", "domain_incremental", "temporal")
#: Scenario keys that apply to one kind only.
_KIND_KEYS = {"tasks": ("class_incremental",), "values": ("domain_incremental",),
              "periods": ("temporal",), "boundaries": ("temporal",)}  # fmt: skip


def _texts(value: Any) -> Any:
    """Scalars of a YAML list as text (``[0, 1]`` -> ``("0", "1")``; dates as ISO text)."""
    if isinstance(value, (list, tuple)):
        return tuple(v if isinstance(v, (list, tuple, Mapping)) else str(v) for v in value)
    return value


def _task_classes(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_texts(g) for g in value)
    return value


@dataclass(frozen=True)
class StreamTrainConfig(Config):
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

    config_key = "train option"

    epochs: int = option(30, low=1)
    lr: float = option(5e-4, low=0, low_open=True)
    weight_decay: float = option(1e-4, low=0)
    batch_instances: int = option(4096, low=1)
    max_bag_instances: int = option(0, low=0)
    balance: str = option("weights", choices=BALANCES)
    grad_clip: float = option(5.0, low=0)
    standardize: bool = True
    device: str = "auto"


@dataclass(frozen=True)
class MemoryConfig(Config):
    """The exemplar memory of the strategies that replay.

    Attributes:
        budget: instances (cells) the memory holds, shared by the (task, class) groups seen so far.
        per_bag: target instances per stored bag.
    """

    config_key = "memory option"

    budget: int = option(5000, low=1)
    per_bag: int = option(32, low=1)


@dataclass(frozen=True)
class StrategyConfig(Config):
    """One configured strategy run: a registered strategy and its options.

    In a file it is written flat: ``ewc: {lam: 1000.0}``; a variant names its registered strategy,
    ``milreplay_ranked: {strategy: milreplay, random_share: 0.0}``, so variants run side by side.

    Attributes:
        strategy: the registered strategy (``list_strategies()``); ``None``: the entry's own name.
        options: the strategy's options (checked against the options it declares when it is created).
    """

    config_key = "strategy option"

    strategy: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, where: str | None = None) -> StrategyConfig:
        """From the flat form (``{strategy: milreplay, random_share: 0.0}``) or ``{strategy, options}``."""
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            message = f"expected a mapping of strategy options, got {type(data).__name__}"
            raise InvalidArgumentError(f"{where}: {message}" if where else message)
        nested = set(data) <= {"strategy", "options"} and isinstance(data.get("options"), Mapping)
        if not nested:
            data = {"strategy": data.get("strategy"), "options": {k: v for k, v in data.items() if k != "strategy"}}
        return super().from_dict(data, where=where)

    def to_dict(self) -> dict[str, Any]:
        """The flat form, as written in a configuration file."""
        return {**({"strategy": self.strategy} if self.strategy is not None else {}), **self.options}

    def check(self, name: str) -> None:
        """The strategy is registered and takes these options (unknown ones named with the closest)."""
        from milcore.continual.strategies.registry import REGISTRY

        entry = REGISTRY.entry(self.strategy or name)  # unknown name: close matches
        check_keys(self.options, entry.metadata.get("options", {}), "option")

    def create(self, name: str) -> Any:
        """The strategy object of the entry ``name`` (unknown strategy or option: InvalidArgumentError)."""
        from milcore.continual.strategies import create_strategy

        return create_strategy(self.strategy or name, **self.options)


@dataclass(frozen=True)
class ScenarioConfig(Config):
    """How the cohort becomes a stream of tasks (:func:`milcore.continual.scenarios.build_scenario`).

    Attributes:
        kind: ``class_incremental``, ``domain_incremental`` or ``temporal``.
        tasks: class_incremental: the class names of each task, in order of arrival.
        column: the cohort column of the tasks: domain_incremental (default ``site``), temporal
            (default ``date``).
        values: domain_incremental: the column's values in task order (default: all, sorted).
        periods: temporal: equal-count periods (default 3, unless ``boundaries``).
        boundaries: temporal: period boundaries (ISO dates, increasing).
        test_fraction: share of each task's patients per class held out for testing.
        split_column: a cohort column naming each bag's side instead (``test_value``: test).
        test_value: the ``split_column`` value of test bags.
        seed: seed of the hold-out split (fixed across strategies and training seeds).
    """

    config_key = "scenario option"

    kind: str = option(choices=KINDS)
    tasks: tuple[tuple[str, ...], ...] | None = option(None, load=_task_classes)
    column: str | None = None
    values: tuple[str, ...] | None = option(None, load=_texts)
    periods: int | None = option(None, low=1)
    boundaries: tuple[str, ...] | None = option(None, load=_texts)
    test_fraction: float = option(0.3, low=0, high=1, low_open=True, high_open=True)
    split_column: str | None = None
    test_value: str = option("test", load=str)
    seed: int = option(0, low=0)

    def validate(self) -> None:
        """Keys of the kind only; class-incremental tasks non-empty, each class in one task."""
        for key, kinds in _KIND_KEYS.items():
            if getattr(self, key) is not None and self.kind not in kinds:
                raise InvalidArgumentError(f"{key} applies to {' and '.join(kinds)} scenarios, not {self.kind}")
        if self.kind == "class_incremental":
            if not self.tasks or not all(self.tasks):
                raise InvalidArgumentError("a class_incremental scenario needs 'tasks': a list of non-empty "
                                           "class-name lists")  # fmt: skip
            flat = [c for g in self.tasks for c in g]
            dupes = sorted({c for c in flat if flat.count(c) > 1})
            if dupes:
                raise InvalidArgumentError(f"class(es) {', '.join(map(repr, dupes))} appear in more than one task")
        bounds = self.boundaries
        if bounds is not None and (len(bounds) < 2 or list(bounds) != sorted(bounds)):
            raise InvalidArgumentError("boundaries must be at least two increasing dates")

    def stream_classes(self) -> tuple[str, ...] | None:
        """class_incremental: every task's classes in order of arrival (the stream's class list), else None."""
        return tuple(c for g in self.tasks for c in g) if self.kind == "class_incremental" and self.tasks else None


@dataclass(frozen=True)
class SyntheticData(Config):
    """Synthetic cohorts generated, extracted and merged for the run (:mod:`milcore.continual.prepare`).

    Attributes:
        cohorts: one mapping of :class:`~feature_cache.sources.synthetic_config.SynthConfig` fields per
            cohort (plus an optional ``name``, default its ``task``).
        encoder: the encoder extracting their features.
        relabel: cohort name (or task) -> {cohort class: stream class}; classes not listed are dropped.
        workers: extraction worker processes.
    """

    config_key = "synthetic data option"

    cohorts: tuple[dict[str, Any], ...] = option(min_items=1)
    encoder: str = "morphology"
    relabel: dict[str, dict[str, str]] = field(default_factory=dict)
    workers: int = option(0, low=0)


@dataclass(frozen=True)
class ContinualData(Config):
    """Where the stream's bags and labels come from: a bank and a cohort table, or synthetic cohorts.

    Attributes:
        bank: feature bank path.
        cohort: cohort table path.
        label: the cohort's label column.
        classes: the stream's classes, in order (others are left out; class_incremental: its tasks').
        synthetic: synthetic cohorts made for the run instead of ``bank`` and ``cohort``.
    """

    config_key = "data option"

    bank: str | None = None
    cohort: str | None = None
    label: str = "diagnosis"
    classes: tuple[str, ...] | None = option(None, load=_texts)
    synthetic: SyntheticData | None = None

    def validate(self) -> None:
        """Either ``synthetic`` or both ``bank`` and ``cohort``."""
        if self.synthetic is None:
            missing = [k for k in ("bank", "cohort") if getattr(self, k) is None]
            if missing:
                raise InvalidArgumentError(f"needs {' and '.join(map(repr, missing))} (or a 'synthetic' recipe)")
        elif self.bank is not None or self.cohort is not None:
            raise InvalidArgumentError("give 'bank' and 'cohort', or 'synthetic', not both")


def _seeds(value: Any) -> Any:
    return (value,) if isinstance(value, int) and not isinstance(value, bool) else value


def _strategies(value: Any) -> Any:
    """``finetune:`` (no options, read as null) is ``finetune: {}``."""
    if isinstance(value, Mapping):
        return {k: (StrategyConfig() if v is None else v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ContinualConfig(Config):
    """A continual experiment.

    Attributes:
        name: experiment name.
        data: where the bags and labels come from (:class:`ContinualData`).
        scenario: how they become a stream of tasks (:class:`ScenarioConfig`).
        model: registered aggregator name (as :attr:`milcore.training.config.TrainConfig.model`).
        model_args: overrides of the aggregator's config (as ``TrainConfig.model_args``).
        train: how each task is trained (:class:`StreamTrainConfig`).
        memory: the exemplar memory (:class:`MemoryConfig`).
        strategies: entry name -> :class:`StrategyConfig`, run in this order.
        seeds: training seeds (the scenario's hold-out split is fixed by ``scenario.seed``).
    """

    config_key = "key"

    data: ContinualData
    scenario: ScenarioConfig
    strategies: dict[str, StrategyConfig] = option(load=_strategies)
    name: str = "continual"
    model: str = "abmil"
    model_args: dict[str, Any] = field(default_factory=dict)
    train: StreamTrainConfig = field(default_factory=StreamTrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    seeds: tuple[int, ...] = option((0,), low=0, min_items=1, load=_seeds)

    def validate(self) -> None:
        """At least one strategy; each registered, with options it takes."""
        if not self.strategies:
            raise InvalidArgumentError("strategies: configure at least one strategy (e.g. finetune: {})")
        for name, strategy in self.strategies.items():
            try:
                strategy.check(name)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"strategies.{name}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str | None = None) -> ContinualConfig:
        """As :meth:`Config.from_dict`; also reads the older ``model: {name: ..., args: {...}}`` form."""
        model = data.get("model") if isinstance(data, Mapping) else None
        if isinstance(model, Mapping) and "model_args" not in data:
            legacy = dict(model)
            unknown = set(legacy) - {"name", "args"}
            if unknown:
                message = f"model: expected an aggregator name (or {{name, args}}), got keys {sorted(unknown)}"
                raise InvalidArgumentError(f"{where}: {message}" if where else message)
            data = {**data, "model": legacy.get("name", "abmil"), "model_args": legacy.get("args") or {}}
        return super().from_dict(data, where=where)

    @property
    def budget(self) -> int:
        """Memory budget in instances (``memory.budget``)."""
        return self.memory.budget

    @property
    def per_bag(self) -> int:
        """Target instances per stored bag (``memory.per_bag``)."""
        return self.memory.per_bag


def load_config(path: str | Path) -> ContinualConfig:
    """Read and validate a YAML configuration.

    Raises:
        UserError: missing or unreadable file, unknown keys, bad values (naming the file).
    """
    from feature_cache.config import read_yaml

    raw = read_yaml(path, what="continual configuration")
    return ContinualConfig.from_dict(raw, where=str(path))
