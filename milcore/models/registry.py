"""Aggregator registry: ``register_aggregator`` / ``create_aggregator`` / ``list_aggregators`` (timm style).

Registration happens when ``milcore.models`` is imported (its ``__init__`` imports one module per
aggregator, each decorated with :func:`register_aggregator`); importing ``milcore`` alone registers
nothing.

Example:
    >>> from milcore.models import create_aggregator, list_aggregators
    >>> list_aggregators("*mil")
    ['abmil', 'amil', 'dsmil', 'graphmil', 'transmil']
    >>> model = create_aggregator("abmil", in_dim=512, num_classes=3, multi_branch=True)
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from feature_cache.errors import InvalidArgumentError

if TYPE_CHECKING:
    from milcore.models.base import AggregatorConfig, MILAggregator

__all__ = [
    "AggregatorEntry",
    "create_aggregator",
    "get_aggregator_entry",
    "list_aggregators",
    "register_aggregator",
]

M = TypeVar("M", bound="type[MILAggregator]")


@dataclass(frozen=True)
class AggregatorEntry:
    """A registered aggregator: its name, config dataclass, module class and one-line summary."""

    name: str
    config_class: type[AggregatorConfig]
    model_class: type[MILAggregator]
    summary: str


_REGISTRY: dict[str, AggregatorEntry] = {}


def register_aggregator(name: str, config: type[AggregatorConfig]) -> Callable[[M], M]:
    """Class decorator registering an aggregator module under ``name`` with its config dataclass.

    Raises:
        ValueError: if ``name`` is already registered, the config is not a frozen
            :class:`~milcore.models.base.AggregatorConfig` dataclass, or the class not a ``MILAggregator``.
    """

    def decorator(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(
                f"aggregator '{name}' is already registered (by {_REGISTRY[name].model_class.__qualname__})"
            )
        from milcore.models.base import AggregatorConfig, MILAggregator

        params = getattr(config, "__dataclass_params__", None)
        if params is None or not params.frozen or not issubclass(config, AggregatorConfig):
            raise ValueError(f"config of aggregator '{name}' must be a @dataclass(frozen=True) AggregatorConfig")
        if not issubclass(cls, MILAggregator):
            raise ValueError(f"aggregator '{name}' must subclass MILAggregator")
        cls.aggregator_name = name
        cls.config_class = config
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = AggregatorEntry(name, config, cls, summary)
        return cls

    return decorator


def list_aggregators(pattern: str = "*") -> list[str]:
    """Sorted names of the registered aggregators matching an ``fnmatch`` pattern (``"*mil"``)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_aggregator_entry(name: str) -> AggregatorEntry:
    """The registry entry of ``name``.

    Raises:
        InvalidArgumentError: for an unknown name, listing the close matches.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise InvalidArgumentError(
            f"unknown aggregator '{name}'{hint} (registered: {', '.join(list_aggregators()) or 'none'})"
        )
    return _REGISTRY[name]


def create_aggregator(name: str, *, in_dim: int, num_classes: int, **overrides: Any) -> MILAggregator:
    """Build a registered aggregator from its config defaults plus ``overrides``.

    Args:
        name: registered name (see :func:`list_aggregators`).
        in_dim: instance feature dimension ``D``.
        num_classes: number of bag classes ``C`` (>= 2).
        **overrides: other fields of the aggregator's config dataclass.

    Raises:
        InvalidArgumentError: unknown name, unknown config field, or an invalid value.
    """
    entry = get_aggregator_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.6)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise InvalidArgumentError(
            f"unknown config field(s) for aggregator '{name}': {', '.join(hints)}; "
            f"valid fields: {', '.join(sorted(fields))}"
        )
    config = entry.config_class(in_dim=in_dim, num_classes=num_classes, **overrides)
    return entry.model_class(config)
