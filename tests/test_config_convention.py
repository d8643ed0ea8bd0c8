"""One config convention (feature_cache.config): every config of the engine is built, checked and written the
same way, and the command-line flags that mirror config fields take their defaults from the fields.

Parametrized over every :class:`~feature_cache.config.Config` subclass found by importing the packages, so a
new config is covered (and must be given an example below) as soon as it exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import pkgutil
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import feature_cache
import milcore
from feature_cache.config import Config, option_spec
from feature_cache.errors import InvalidArgumentError


def _import_everything() -> None:
    for package in (feature_cache, milcore):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(module.name)
            except ImportError:  # an optional dependency (torchmil, tensorboard, ...) that is not installed
                continue


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


_import_everything()
ours = ("feature_cache.", "milcore.")
CONFIGS = sorted({c for c in _subclasses(Config) if c.__module__.startswith(ours)}, key=lambda c: c.__qualname__)

#: Values of the required fields of each config (the others keep their defaults).
REQUIRED: dict[str, dict[str, Any]] = {
    "RunSpec": {"bank": "b.h5", "cohort": "c.csv", "task": "dx"},
    "ExperimentSpec": {"bank": "b.h5", "cohort": "c.csv", "task": "dx"},
    "BenchSpec": {"bank": "b.h5", "cohort": "c.csv", "task": "dx"},
    "ExtractConfig": {"source": "crops", "input": "in", "encoder": "toy", "out": "b.h5"},
    "ScenarioConfig": {"kind": "class_incremental", "tasks": [["a", "b"], ["c"]]},
    "SyntheticData": {"cohorts": [{"task": "aml", "patients": 4}]},
    "ContinualData": {"bank": "b.h5", "cohort": "c.csv", "classes": ["a", "b"]},
    "SynthCase": {"name": "aml", "task": "aml"},
    "EncoderTrainConfig": {"data": "cells.npz", "out": "enc"},
    "SupervisedConfig": {"data": "cells.npz", "out": "enc"},
    "SSLConfig": {"data": "cells.npz", "out": "enc"},
    "ProbeConfig": {"data": "cells.npz", "encoder": "toy"},
    "ContinualConfig": {"data": {"bank": "b.h5", "cohort": "c.csv"}, "scenario": {"kind": "temporal", "periods": 2},
                        "strategies": {"finetune": {}, "ranked": {"strategy": "milreplay", "random_share": 0.0}}},
}  # fmt: skip
#: Frozen dataclasses named like configs that are records, not configurations.
NOT_CONFIGS = {
    "OptionSpec": "the convention's own field metadata",
    "EncoderSpec": "a registry entry (name, factory, metadata), built by register_encoder",
    "WhiteCellSpec": "a row of the synthetic cell vocabulary (constants, never user input)",
    "RedCellSpec": "a row of the synthetic cell vocabulary (constants, never user input)",
    "TaskSpec": "a row of the synthetic cell vocabulary (constants, never user input)",
    "WriterConfig": "bank storage parameters: the bank API reports them as BankError (left to the bank's owner)",
}


def example(cls: type[Config]) -> Config:
    """A valid instance: required fields from REQUIRED (aggregators: in_dim 8, 2 classes), defaults otherwise."""
    from milcore.models.base import AggregatorConfig

    if issubclass(cls, AggregatorConfig):
        return cls.from_dict({"in_dim": 8, "num_classes": 2})
    return cls.from_dict(REQUIRED.get(cls.__name__, {}))


def test_every_config_is_found_and_has_an_example() -> None:
    names = {c.__name__ for c in CONFIGS}
    assert {"TrainConfig", "RunSpec", "AuditConfig", "ExperimentSpec", "BenchSpec", "ContinualConfig",
            "StreamTrainConfig", "ScenarioConfig", "MemoryConfig", "StrategyConfig", "ContinualData", "SynthConfig",
            "ExtractConfig", "DetectorConfig", "BloodMnistBags", "AggregatorConfig"} <= names  # fmt: skip
    for cls in CONFIGS:
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # fmt: skip
        assert not required or cls.__name__ in REQUIRED or {"in_dim", "num_classes"} >= set(required), (
            f"{cls.__qualname__}: add an example of its required fields {required} to REQUIRED"
        )


def test_every_config_like_dataclass_follows_the_convention() -> None:
    """A frozen dataclass named ``*Config``/``*Spec`` in the packages is a Config (or a listed record)."""
    offenders = []
    for module_name in [m for m in list(importlib.sys.modules) if m.startswith(ours)]:
        module = importlib.sys.modules[module_name]
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and obj.__module__ == module_name and dataclasses.is_dataclass(obj)
                    and name.endswith(("Config", "Spec")) and not issubclass(obj, Config)
                    and name not in NOT_CONFIGS):  # fmt: skip
                offenders.append(f"{module_name}.{name}")
    assert not offenders, f"configs outside the convention: {offenders}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__qualname__)
def test_round_trip_through_plain_json_and_yaml(cls: type[Config]) -> None:
    config = example(cls)
    plain = config.to_dict()
    assert cls.from_dict(plain) == config
    assert cls.from_dict(json.loads(json.dumps(plain))) == config
    assert cls.from_dict(yaml.safe_load(yaml.safe_dump(plain))) == config


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__qualname__)
def test_frozen(cls: type[Config]) -> None:
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen, f"{cls.__qualname__} is not @dataclass(frozen=True)"
    config = example(cls)
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, name, getattr(config, name))


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__qualname__)
def test_unknown_key_is_refused_with_the_closest_name(cls: type[Config]) -> None:
    from milcore.continual.config import ContinualConfig, StrategyConfig

    config = example(cls)
    if cls is StrategyConfig:  # written flat (other keys are the strategy's options): checked against the strategy
        raw = REQUIRED["ContinualConfig"]
        with pytest.raises(InvalidArgumentError, match=r"strategies.ranked: unknown option\(s\) 'random_sharex' "
                                                       r"\(did you mean 'random_share'\?\)"):  # fmt: skip
            ContinualConfig.from_dict({**raw, "strategies": {"ranked": {"strategy": "milreplay", "random_sharex": 0}}})
        with pytest.raises(InvalidArgumentError, match=r"strategies.ranked: unknown strategy 'milreplayx'; did you"):
            ContinualConfig.from_dict({**raw, "strategies": {"ranked": {"strategy": "milreplayx"}}})
        return
    for f in dataclasses.fields(cls):
        typo = f.name + "x"
        with pytest.raises(InvalidArgumentError, match=rf"'{typo}' \(did you mean '{f.name}'\?\)"):
            cls.from_dict({**config.to_dict(), typo: 1})
        with pytest.raises(InvalidArgumentError, match=rf"'{typo}' \(did you mean '{f.name}'\?\)"):
            config.replace(**{typo: 1})


def _wrong_value(hint: Any) -> Any:
    """A value of another type than ``hint`` (``None`` when any value fits)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    wrong = {str: 123, int: "ten", float: "abc", bool: "yes", tuple: 5, dict: 5}
    if origin in wrong:
        return wrong[origin]
    if inspect.isclass(hint) and issubclass(hint, Config):
        return 5
    return None


CASES = [(cls, f.name) for cls in CONFIGS for f in dataclasses.fields(cls)
         if option_spec(f).load is None and _wrong_value(typing.get_type_hints(cls)[f.name]) is not None]  # fmt: skip


@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.__qualname__}.{n}" for c, n in CASES])
def test_wrong_type_names_the_key(cls: type[Config], name: str) -> None:
    config = example(cls)
    bad = _wrong_value(typing.get_type_hints(cls)[name])
    if cls.__name__ != "StrategyConfig":  # (written flat: any other key is an option)
        with pytest.raises(InvalidArgumentError, match=name):
            cls.from_dict({**config.to_dict(), name: bad})
    with pytest.raises(InvalidArgumentError, match=name):
        config.replace(**{name: bad})


def test_defaults_did_not_change() -> None:
    """The values before the convention (a renamed or moved field would fail here too)."""
    from feature_cache.sources.synthetic_config import SynthConfig
    from milcore.audit.config import AuditConfig, ExperimentSpec
    from milcore.bench.config import BenchSpec
    from milcore.continual.config import MemoryConfig, StreamTrainConfig
    from milcore.training.config import TrainConfig

    assert TrainConfig().to_dict() == {
        "model": "abmil", "model_args": {}, "epochs": 40, "lr": 5e-4, "weight_decay": 1e-4, "optimizer": "adamw",
        "batch_instances": 2048, "max_bag_instances": 4096, "instance_dropout": 0.0, "input_norm": "none",
        "class_weighting": "balanced", "sampler": "shuffle", "bel_weight": 0.0, "grad_clip": 5.0, "patience": 10,
        "min_epochs": 5, "monitor": "val_loss", "amp": "auto", "device": "auto", "seed": 0, "memory_budget_gb": 4.0,
        "num_workers": 2, "deterministic": True, "tensorboard": False}  # fmt: skip
    assert StreamTrainConfig().to_dict() == {"epochs": 30, "lr": 5e-4, "weight_decay": 1e-4, "batch_instances": 4096,
                                             "max_bag_instances": 0, "balance": "weights", "grad_clip": 5.0,
                                             "standardize": True, "device": "auto"}  # fmt: skip
    assert MemoryConfig().to_dict() == {"budget": 5000, "per_bag": 32}
    audit = AuditConfig()
    assert (audit.attributes, audit.min_group_size, audit.alpha, audit.correction, audit.n_boot, audit.n_perm,
            audit.n_bins, audit.intersections, audit.per_class) == (
        ("sex", "age", "site"), 10, 0.05, "westfall-young", 1000, 2000, 10, True, True)  # fmt: skip
    assert audit.age_bands == ((0, 45), (46, 59), (60, 71), (72, 86), (87, 130))
    spec = ExperimentSpec("b", "c", "t")
    assert (spec.train.model, spec.fractions, spec.seeds, spec.train_size, spec.test_fraction, spec.val_fraction,
            spec.age, spec.train.epochs, spec.train.patience, spec.train.lr, spec.train.device) == (
        "abmil", (0.0, 0.25, 0.5, 0.75, 1.0), 3, 0, 0.3, 0.2, True, 30, 8, 5e-4, "auto")  # fmt: skip
    bench = BenchSpec("b", "c", "t")  # the CLI's defaults (the class used to default to TrainConfig())
    assert (bench.folds, bench.seeds, bench.train.epochs, bench.train.patience, bench.train.lr) == (5, (0, 1, 2), 20,
                                                                                                   5, 5e-4)  # fmt: skip
    assert SynthConfig().to_dict()["bag_range"] == [10, 2000] and SynthConfig().crop_size == 96


# ------------------------------------------------------------------------------ CLI flags from the fields


def _parser() -> argparse.ArgumentParser:
    from milcore.cli import build_parser

    return build_parser()


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_subparsers(sub, (*path, name)))
    return out


def _mirrored() -> dict[tuple[str, ...], list[Config]]:
    """Commands -> the configs (default sources) whose fields they expose as flags."""
    from milcore.audit.config import EXPERIMENT_TRAIN, AuditConfig, ExperimentSpec
    from milcore.bench.config import BENCH_TRAIN, BenchSpec
    from milcore.continual.config import ContinualConfig
    from milcore.training.config import RunSpec, TrainConfig

    bench = [BenchSpec, BENCH_TRAIN]
    return {("train",): [TrainConfig, RunSpec], ("audit",): [AuditConfig],
            ("audit", "experiment"): [ExperimentSpec, EXPERIMENT_TRAIN, AuditConfig], ("continual",): [ContinualConfig],
            ("bench", "aggregators"): bench, ("bench", "synthetic"): bench, ("bench", "bloodmnist-bags"): bench,
            ("bench", "all"): bench}  # fmt: skip


def _defaults(source: Any) -> dict[str, Any]:
    return source.defaults() if isinstance(source, type) else source.to_dict() | {
        f.name: getattr(source, f.name) for f in dataclasses.fields(source)}


def test_every_flag_mirroring_a_config_field_has_the_fields_default() -> None:
    """A flag whose dest is a field with a default must be derived from it: a default cannot be declared twice."""
    parsers = _subparsers(_parser())
    checked = 0
    for path, sources in _mirrored().items():
        parser = parsers[path]
        for action in parser._actions:
            for source in sources:
                cls = source if isinstance(source, type) else type(source)
                defaults = _defaults(source)
                if action.dest not in defaults:
                    continue
                mirror = getattr(action, "config_field", None)
                assert mirror is not None, f"milcore {' '.join(path)} {action.option_strings}: declared by hand, " \
                                           f"not derived from {cls.__name__}.{action.dest}"  # fmt: skip
                if mirror[0] is not cls:
                    continue
                want = defaults[action.dest]
                assert action.config_default == want
                assert action.default in (None, want), f"{path} {action.option_strings}: {action.default} != {want}"
                if want is not None and want != ():
                    assert action.help.count("(default ") == 1, f"{path} {action.option_strings}: {action.help}"
                checked += 1
    assert checked > 40


def _capture(monkeypatch: pytest.MonkeyPatch, target: str) -> list:
    """Replace ``target`` by a function recording its arguments and stopping the command."""
    seen: list = []

    class StopError(Exception):
        pass

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen.append(args)
        raise StopError

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, fake)
    seen.append(StopError)
    return seen


def _run(argv: list[str], seen: list) -> tuple:
    args = _parser().parse_args(argv)
    with pytest.raises(seen[0]):
        args.func(args)
    return seen[1]


def test_commands_without_flags_build_the_configs_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from milcore.audit.config import AuditConfig, ExperimentSpec
    from milcore.bench.config import BenchSpec
    from milcore.continual.config import load_config
    from milcore.training.config import RunSpec, TrainConfig

    seen = _capture(monkeypatch, "milcore.crossval.train_run")
    spec, config, _ = _run(["train", "--bank", "b.h5", "--cohort", "c.csv", "--task", "dx", "--out", "o"], seen)
    assert config == TrainConfig() and spec == RunSpec("b.h5", "c.csv", "dx")

    seen = _capture(monkeypatch, "milcore.audit.run.audit_run")
    _, _, _, config = _run(["audit", "--run", "r", "--cohort", "c.csv", "--out", "o"], seen)
    assert config == AuditConfig()

    seen = _capture(monkeypatch, "milcore.audit.imbalance.run_imbalance_experiment")
    spec, config, _ = _run(["audit", "experiment", "--bank", "b", "--cohort", "c", "--task", "t", "--out", "o"], seen)
    assert spec == ExperimentSpec("b", "c", "t") and config == AuditConfig()

    from milcore.cli.bench import _template

    args = _parser().parse_args(["bench", "aggregators", "--bank", "b", "--cohort", "c", "--task", "t", "--out", "o"])
    assert _template(args, "b", "c", "t") == BenchSpec("b", "c", "t")

    path = Path(__file__).parents[1] / "experiments" / "continual_domain_incremental.yaml"
    seen = _capture(monkeypatch, "milcore.continual.runner.run_continual")
    (config, *_) = _run(["continual", "--config", str(path), "--out", str(tmp_path / "o")], seen)
    assert config == load_config(path)


def test_train_keeps_a_config_files_seed_unless_seed_is_given(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:  # fmt: skip
    """``--seed`` used to default to 0 and silently replace the seed of a ``--config`` file."""
    path = tmp_path / "train.yaml"
    path.write_text("train:\n  seed: 3\n  epochs: 7\n")
    base = ["train", "--bank", "b.h5", "--cohort", "c.csv", "--task", "dx", "--out", "o", "--config", str(path)]
    seen = _capture(monkeypatch, "milcore.crossval.train_run")
    spec, config, _ = _run(base, seen)
    assert (config.seed, spec.seed, config.epochs) == (3, 3, 7)
    seen = _capture(monkeypatch, "milcore.crossval.train_run")
    spec, config, _ = _run([*base, "--seed", "5", "--epochs", "2"], seen)
    assert (config.seed, spec.seed, config.epochs) == (5, 5, 2)


# ------------------------------------------------------------------ a bad value from YAML, the CLI, Python


def test_a_bad_value_is_an_invalid_argument_error_from_python_yaml_and_the_cli(tmp_path: Path, capsys) -> None:
    from milcore.cli import main
    from milcore.continual.config import ContinualConfig, load_config
    from milcore.training.config import TrainConfig, options_from_file

    with pytest.raises(InvalidArgumentError, match="epochs must be >= 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(InvalidArgumentError, match=r"train\.yaml: train: epochs must be >= 1, got 0"):
        options_from_file(yaml.safe_load("train:\n  epochs: 0\n"), tmp_path / "train.yaml")
    base = ["train", "--bank", "b.h5", "--cohort", "c.csv", "--task", "dx", "--out", str(tmp_path / "o")]
    assert main([*base, "--epochs", "0"]) == 2
    assert "argument --epochs: must be >= 1, got 0" in capsys.readouterr().err
    assert main([*base, "--optimizer", "adamm"]) == 2
    assert "argument --optimizer: must be one of 'adamw', 'sgd', got 'adamm'" in capsys.readouterr().err
    (tmp_path / "t.yaml").write_text("train:\n  lr: -1\n")
    assert main([*base, "--config", str(tmp_path / "t.yaml")]) == 2
    assert "t.yaml: train: lr must be > 0, got -1" in capsys.readouterr().err

    raw = yaml.safe_load((Path(__file__).parents[1] / "experiments" / "continual_class_incremental.yaml").read_text())
    with pytest.raises(InvalidArgumentError, match="train: epochs must be >= 1, got 0"):
        ContinualConfig.from_dict({**raw, "train": {**raw["train"], "epochs": 0}})
    with pytest.raises(InvalidArgumentError, match=r"memory: unknown memory option\(s\) 'budjet' \(did you mean"):
        ContinualConfig.from_dict({**raw, "memory": {"budjet": 10}})
    with pytest.raises(InvalidArgumentError, match="scenario: tasks applies to class_incremental"):
        ContinualConfig.from_dict({**raw, "scenario": {"kind": "temporal", "tasks": [["a"]]}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**raw, "strategies": {"ewc": 3}}))
    with pytest.raises(InvalidArgumentError, match=r"c\.yaml: strategies\.ewc must be a mapping"):
        load_config(tmp_path / "c.yaml")
    assert main(["audit", "--run", "r", "--cohort", "c", "--out", "o", "--alpha", "2"]) == 2
    assert "argument --alpha: must be in (0, 1), got 2.0" in capsys.readouterr().err
    assert main(["bench", "aggregators", "--bank", "b", "--cohort", "c", "--task", "t", "--out", "o",
                 "--seeds", "0,-1"]) == 2  # fmt: skip
    assert "argument --seeds: must be >= 0, got -1" in capsys.readouterr().err


def test_the_older_continual_model_form_is_still_read() -> None:
    from milcore.continual.config import ContinualConfig

    raw = yaml.safe_load((Path(__file__).parents[1] / "experiments" / "continual_class_incremental.yaml").read_text())
    now = ContinualConfig.from_dict(raw)
    old = {k: v for k, v in raw.items() if k != "model_args"} | {"model": {"name": now.model, "args": now.model_args}}
    assert ContinualConfig.from_dict(old) == now
    assert now.strategies["milreplay_ranked"].strategy == "milreplay"
    assert now.to_dict()["strategies"] == raw["strategies"], "strategies are written back in the file's flat form"


# --------------------------------------------------------------------- a YAML file, a CLI and Python agree


def _train_values() -> st.SearchStrategy[dict[str, Any]]:
    from milcore.training.config import TrainConfig

    fields: dict[str, st.SearchStrategy] = {}
    for f in dataclasses.fields(TrainConfig):
        spec, hint = option_spec(f), typing.get_type_hints(TrainConfig)[f.name]
        if spec.allowed() is not None:
            fields[f.name] = st.sampled_from(spec.allowed())
        elif hint is int:
            fields[f.name] = st.integers(int(spec.low or 0) + int(spec.low_open), 10_000)
        elif hint is float:
            high = spec.high if spec.high is not None else 1e3
            fields[f.name] = st.floats(spec.low or 0, high, exclude_min=spec.low_open, exclude_max=spec.high_open)
        elif hint is bool:
            fields[f.name] = st.booleans()
    return st.fixed_dictionaries({}, optional=fields)


@settings(max_examples=40, deadline=None)
@given(values=_train_values())
def test_yaml_cli_and_python_build_the_same_train_config(values: dict[str, Any]) -> None:
    from milcore.cli._types import config_values
    from milcore.cli.train import TRAIN_FLAGS, train_options
    from milcore.training.config import TrainConfig

    python = TrainConfig(**values)
    from_yaml = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump({"train": values}))["train"])
    argv = ["train", "--bank", "b", "--cohort", "c", "--task", "t", "--out", "o"]
    for name, value in values.items():
        flag = TRAIN_FLAGS.get(name, (f"--{name.replace('_', '-')}",))[0]
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    from_cli = TrainConfig.from_dict(config_values(_parser().parse_args(argv), train_options()))
    assert python == from_yaml == from_cli
