"""Hyper-parameter search spaces declared by the aggregators themselves (read by ``milcore bench --tune``).

Every aggregator declares, on its class, the dimensions a tuner may vary -- its *own* hyper-parameters
(widths, numbers of heads, branches, neighbours, auxiliary-loss weights), never the training settings
shared by every model (learning rate, weight decay, dropout, instance dropout), which the tuner adds
itself so that every aggregator gets the same shared dimensions::

    @register_aggregator("abmil", config=ABMILConfig)
    class ABMIL(MILAggregator):
        search_space = declare_space(
            embed_dim=SearchDim(64, 512, log=True),  # whole numbers: both bounds are ints
            gated=SearchDim(choices=(True, False)),
        )

:func:`declare_space` returns a read-only mapping (a subclass may replace its parent's space, never
mutate it). Keys are fields of the aggregator's config; a dimension is either a numeric range (``low``, ``high``,
``log``; integer when both bounds are ``int``) or a set of ``choices``. Read them with
:func:`search_space` (by registered name, class or built model); check a user's value against them with
:func:`check_search_value` (one line naming the aggregator, the key and the declared range); draw a value
for an Optuna trial with :meth:`SearchDim.suggest`. ``tests/models/test_search.py`` checks that every
registered aggregator declares a non-empty space whose keys are config fields and whose ends and choices
all build a valid model.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from feature_cache.config import did_you_mean
from feature_cache.errors import InvalidArgumentError

__all__ = ["SearchDim", "check_search_space", "check_search_value", "declare_space", "search_space"]


@dataclass(frozen=True)
class SearchDim:
    """One dimension of a search space: a numeric range or a set of choices.

    Attributes:
        low: lower end of a numeric range (inclusive).
        high: upper end of a numeric range (inclusive).
        log: sample the range on a log scale (``low`` must then be > 0).
        choices: the values of a categorical dimension (then ``low``/``high`` stay ``None``).

    A range is of whole numbers when both ends are ``int`` (``SearchDim(64, 512)``), of reals otherwise
    (``SearchDim(0.05, 2.0, log=True)``).
    """

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if not isinstance(self.choices, tuple) or not self.choices:
                raise InvalidArgumentError(f"SearchDim choices must be a non-empty tuple, got {self.choices!r}")
            if self.low is not None or self.high is not None or self.log:
                raise InvalidArgumentError("SearchDim takes either choices or low/high (and log), not both")
            return
        ends = (self.low, self.high)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in ends):
            raise InvalidArgumentError(f"SearchDim needs finite numbers low and high (or choices), got {ends}")
        if not self.low < self.high:
            raise InvalidArgumentError(f"SearchDim low must be < high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise InvalidArgumentError(f"SearchDim on a log scale needs low > 0, got {self.low}")

    @property
    def kind(self) -> str:
        """``"categorical"``, ``"int"`` or ``"float"``."""
        if self.choices is not None:
            return "categorical"
        return "int" if isinstance(self.low, int) and isinstance(self.high, int) else "float"

    def contains(self, value: object) -> bool:
        """Whether ``value`` lies in this dimension (a whole number for an integer range)."""
        if self.choices is not None:
            return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.kind == "int" and float(value) != int(value):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        """``[64, 512] (log scale)`` or ``one of 'gcn', 'gat'``."""
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        return f"[{self.low}, {self.high}]" + (" (log scale)" if self.log else "")

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw this dimension's value for an Optuna ``trial`` under ``name``."""
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)


def declare_space(**dims: SearchDim) -> Mapping[str, SearchDim]:
    """A read-only search space, config field -> :class:`SearchDim` (what an aggregator class declares)."""
    for key, dim in dims.items():
        if not isinstance(dim, SearchDim):
            raise InvalidArgumentError(f"search dimension {key!r} must be a SearchDim, got {type(dim).__name__}")
    return MappingProxyType(dict(dims))


def _model_class(model: str | type | object) -> type:
    if isinstance(model, str):
        from milcore.models.registry import get_aggregator_entry

        return get_aggregator_entry(model).model_class
    return model if inspect.isclass(model) else type(model)


def _label(model: str | type | object) -> str:
    cls = _model_class(model)
    return getattr(cls, "aggregator_name", "") or cls.__name__


def search_space(model: str | type | object) -> dict[str, SearchDim]:
    """The search space an aggregator declares (a copy), from its registered name, class or a built model.

    A module that declares none (a user's ``nn.Module``) has an empty space.

    Raises:
        InvalidArgumentError: an unknown aggregator name (with close matches).
    """
    return dict(getattr(_model_class(model), "search_space", {}) or {})


def check_search_value(model: str | type | object, key: str, value: object) -> None:
    """Refuse a value for ``key`` that the aggregator's declared search space does not hold.

    Raises:
        InvalidArgumentError: one line naming the aggregator and the key: an undeclared key (with the
            closest declared one) or a value outside the declared range or choices.
    """
    space, name = search_space(model), _label(model)
    if key not in space:
        declared = ", ".join(sorted(space)) or "none"
        raise InvalidArgumentError(f"aggregator {name!r} declares no search dimension {key!r}"
                                   f"{did_you_mean(key, list(space))} (declared: {declared})")  # fmt: skip
    dim = space[key]
    if not dim.contains(value):
        raise InvalidArgumentError(f"aggregator {name!r}: {key}={value!r} is outside its declared search space "
                                   f"{dim.describe()}")  # fmt: skip


def check_search_space(model_class: type, config_class: type | None = None) -> None:
    """Check a declared space: ``SearchDim`` values keyed by fields of the config (not ``in_dim``/``num_classes``).

    Raises:
        InvalidArgumentError: naming the aggregator and the offending key.
    """
    name = _label(model_class)
    space = getattr(model_class, "search_space", {})
    if not isinstance(space, Mapping):
        raise InvalidArgumentError(f"aggregator {name!r}: search_space must be a mapping of SearchDim")
    config_class = config_class or getattr(model_class, "config_class", None)
    fields = {f.name for f in dataclasses.fields(config_class)} - {"in_dim", "num_classes"} if config_class else None
    for key, dim in space.items():
        if not isinstance(dim, SearchDim):
            raise InvalidArgumentError(f"aggregator {name!r}: search_space[{key!r}] must be a SearchDim, "
                                       f"got {type(dim).__name__}")  # fmt: skip
        if fields is not None and key not in fields:
            raise InvalidArgumentError(f"aggregator {name!r}: search dimension {key!r} is not a config field"
                                       f"{did_you_mean(key, sorted(fields))}")  # fmt: skip
