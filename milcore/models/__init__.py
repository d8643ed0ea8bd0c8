"""MIL aggregators behind one contract (see :mod:`milcore.models.base`) and their registry.

Every module of this package that calls :func:`register_aggregator` is an aggregator: found by the
registry without importing it, imported when it is first built. Build one with
``create_aggregator(name, in_dim=..., num_classes=..., **overrides)``; list them with
``list_aggregators("*")``; ask what one needs with ``aggregator_needs(name)``. Importing this package
is cheap (no torch): the names below are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from milcore.models.base import AggregatorConfig, EpochContext, MILAggregator
    from milcore.models.output import MILOutput
    from milcore.models.registry import (
        AggregatorEntry,
        AggregatorNeeds,
        aggregator_needs,
        control_class_of,
        create_aggregator,
        get_aggregator_entry,
        list_aggregators,
        register_aggregator,
    )

_WHERE = {
    "AggregatorConfig": "milcore.models.base",
    "EpochContext": "milcore.models.base",
    "MILAggregator": "milcore.models.base",
    "MILOutput": "milcore.models.output",
    "AggregatorEntry": "milcore.models.registry",
    "AggregatorNeeds": "milcore.models.registry",
    "aggregator_needs": "milcore.models.registry",
    "control_class_of": "milcore.models.registry",
    "create_aggregator": "milcore.models.registry",
    "get_aggregator_entry": "milcore.models.registry",
    "list_aggregators": "milcore.models.registry",
    "register_aggregator": "milcore.models.registry",
}

__all__ = [
    "AggregatorConfig",
    "AggregatorEntry",
    "AggregatorNeeds",
    "EpochContext",
    "MILAggregator",
    "MILOutput",
    "aggregator_needs",
    "control_class_of",
    "create_aggregator",
    "get_aggregator_entry",
    "list_aggregators",
    "register_aggregator",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'milcore.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
