"""Continual-learning strategies behind one protocol (see :mod:`.base`) and their registry (:mod:`.registry`).

Every module of this package that calls :func:`register_strategy` is a strategy: found without
importing it, imported when it is first created (adding a strategy is one new file). Importing this
package is cheap (no torch): the names below are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from milcore.continual.strategies.base import Strategy, StrategyContext
    from milcore.continual.strategies.registry import (
        create_strategy,
        list_strategies,
        register_strategy,
        strategy_names,
    )

_WHERE = {
    "Strategy": "milcore.continual.strategies.base",
    "StrategyContext": "milcore.continual.strategies.base",
    "create_strategy": "milcore.continual.strategies.registry",
    "list_strategies": "milcore.continual.strategies.registry",
    "register_strategy": "milcore.continual.strategies.registry",
    "strategy_names": "milcore.continual.strategies.registry",
}

__all__ = ["Strategy", "StrategyContext", "create_strategy", "list_strategies", "register_strategy", "strategy_names"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'milcore.continual.strategies' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
