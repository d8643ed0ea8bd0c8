"""Search spaces declared by the aggregators (``milcore.models.search``), read by ``milcore bench --tune``."""

from __future__ import annotations

import dataclasses

import pytest

from feature_cache.errors import InvalidArgumentError
from milcore.models import create_aggregator, get_aggregator_entry, list_aggregators
from milcore.models.search import (
    SearchDim,
    check_search_space,
    check_search_value,
    declare_space,
    search_space,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _points(dim: SearchDim) -> list:
    if dim.choices is not None:
        return list(dim.choices)
    if dim.kind == "int":
        return [dim.low, (dim.low + dim.high) // 2, dim.high]
    return [dim.low, (dim.low + dim.high) / 2, dim.high]


@pytest.mark.parametrize("name", list_aggregators())
def test_every_aggregator_declares_a_space_of_its_own_config_fields(name: str) -> None:
    entry = get_aggregator_entry(name)
    space = search_space(name)
    assert space, f"{name} declares no search space"
    check_search_space(entry.model_class, entry.config_class)
    fields = {f.name for f in dataclasses.fields(entry.config_class)}
    assert set(space) <= fields - {"in_dim", "num_classes"}
    for key, dim in space.items():  # every end and choice builds a model (others at their defaults)
        for value in _points(dim):
            check_search_value(name, key, value)
            create_aggregator(name, in_dim=8, num_classes=3, **{key: value})


def test_space_is_read_only_and_found_from_name_class_or_model() -> None:
    model = create_aggregator("abmil", in_dim=4, num_classes=2)
    assert search_space("abmil") == search_space(type(model)) == search_space(model)
    with pytest.raises(TypeError):
        type(model).search_space["embed_dim"] = SearchDim(1, 2)  # type: ignore[index]
    assert search_space(object()) == {}  # a module that declares nothing has an empty space


def test_values_outside_the_declared_space_are_named() -> None:
    with pytest.raises(InvalidArgumentError, match=r"aggregator 'abmil': attention_dim=1024 is outside its declared "
                                                   r"search space \[32, 256\] \(log scale\)"):  # fmt: skip
        check_search_value("abmil", "attention_dim", 1024)
    with pytest.raises(InvalidArgumentError, match=r"'graphmil': conv='sage' is outside .* one of 'gin', 'gcn', 'gat'"):
        check_search_value("graphmil", "conv", "sage")
    with pytest.raises(InvalidArgumentError, match=r"attention_dim=64.5 is outside"):  # an int range
        check_search_value("abmil", "attention_dim", 64.5)
    with pytest.raises(InvalidArgumentError, match=r"gated=1 is outside"):  # 1 is not True
        check_search_value("abmil", "gated", 1)
    with pytest.raises(InvalidArgumentError, match=r"declares no search dimension 'atention_dim' "
                                                   r"\(did you mean 'attention_dim'\?\)"):  # fmt: skip
        check_search_value("abmil", "atention_dim", 64)
    with pytest.raises(InvalidArgumentError, match=r"unknown aggregator 'abmill'"):
        check_search_value("abmill", "attention_dim", 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low": 4, "high": 2}, "low must be < high"),
        ({"low": 0, "high": 2, "log": True}, "log scale needs low > 0"),
        ({"low": 1}, "finite numbers low and high"),
        ({"choices": ()}, "non-empty tuple"),
        ({"choices": ("a",), "low": 1}, "not both"),
        ({"low": True, "high": 3}, "finite numbers"),
    ],
)
def test_malformed_dimensions_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        SearchDim(**kwargs)


def test_a_space_naming_a_missing_field_is_refused() -> None:
    from milcore.models.abmil import ABMIL, ABMILConfig

    class Broken(ABMIL):
        search_space = declare_space(embed_dims=SearchDim(8, 16))

    with pytest.raises(InvalidArgumentError, match=r"'embed_dims' is not a config field \(did you mean 'embed_dim'"):
        check_search_space(Broken, ABMILConfig)
    with pytest.raises(InvalidArgumentError, match="must be a SearchDim"):
        declare_space(embed_dim=(8, 16))  # type: ignore[arg-type]


def test_suggest_draws_within_the_dimension_with_optuna() -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    dims = {"i": SearchDim(16, 256, log=True), "f": SearchDim(0.1, 1.0), "c": SearchDim(choices=("gin", "gcn"))}
    for _ in range(20):
        trial = study.ask()
        values = {k: d.suggest(trial, k) for k, d in dims.items()}
        assert all(d.contains(values[k]) for k, d in dims.items()), values
        assert isinstance(values["i"], int) and isinstance(values["f"], float)
        study.tell(trial, 0.0)
