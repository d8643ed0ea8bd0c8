"""Strategy registry: ``register_strategy`` / ``create_strategy`` / ``list_strategies``.

One :class:`~feature_cache.registry.Registry` (see there for discovery and plug-ins): every module of
``milcore.continual.strategies`` that calls ``register_strategy("name")`` is a built-in, found without
importing it, so adding a strategy is one new file and listing names imports no torch. Plug-ins come
from the entry-point group ``milcore.strategies`` or ``$MILCORE_PLUGINS``. The entry's metadata says
whether a strategy keeps an exemplar memory (``uses_memory``) and its options with their defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from feature_cache.errors import InvalidArgumentError
from feature_cache.registry import Registry

if TYPE_CHECKING:
    from milcore.continual.strategies.base import Strategy

__all__ = ["PROTOCOL", "REGISTRY", "create_strategy", "list_strategies", "register_strategy", "strategy_names"]

S = TypeVar("S", bound=type)

#: What the runner calls on every strategy (see :mod:`milcore.continual.strategies.base`).
PROTOCOL = ("before_task", "train_items", "loss", "after_task", "state_dict", "load_state_dict")


def _check(name: str, cls: Any, metadata: Mapping[str, Any]) -> None:
    """Refuse what is not a class with the protocol's methods and a dict of ``options``."""
    if not inspect.isclass(cls):
        raise InvalidArgumentError(f"strategy {name!r}: {cls!r} is not a class")
    missing = [m for m in PROTOCOL if not callable(getattr(cls, m, None))]
    if missing:
        raise InvalidArgumentError(
            f"strategy {name!r}: {cls.__qualname__} lacks {', '.join(missing)} (subclass "
            f"milcore.continual.strategies.base.Strategy)"
        )
    if not isinstance(getattr(cls, "options", None), dict):
        raise InvalidArgumentError(f"strategy {name!r}: {cls.__qualname__}.options must be a dict of defaults")


REGISTRY: Registry[type[Strategy]] = Registry(
    "strategy", package="milcore.continual.strategies", call="register_strategy", plugin_group="milcore.strategies",
    check=_check,
)  # fmt: skip


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator registering a strategy under ``name`` (a taken name is an error).

    Raises:
        InvalidArgumentError: ``name`` is taken by another class, or the class lacks protocol methods.
    """

    def decorator(cls: S) -> S:
        _check(name, cls, {})
        REGISTRY.add(name, cls, uses_memory=bool(getattr(cls, "uses_memory", False)),
                     options=dict(getattr(cls, "options", {})))  # fmt: skip
        cls.name = name
        return cls

    return decorator


def list_strategies(pattern: str = "*") -> list[str]:
    """Registered strategy names matching a wildcard pattern, sorted; imports none of them."""
    return REGISTRY.names(pattern)


def create_strategy(name: str, **options: Any) -> Strategy:
    """A strategy by name with its options.

    Raises:
        InvalidArgumentError: unknown name (close matches listed) or option.
    """
    return REGISTRY.get(name)(**options)


def strategy_names(configured: Mapping[str, Any]) -> dict[str, str]:
    """Configured entry -> registered strategy (an entry may name it with ``strategy:``), all checked.

    Args:
        configured: entry name -> its options mapping or a config object with a ``strategy`` attribute.

    Raises:
        InvalidArgumentError: an entry naming an unknown strategy (close matches listed), before any work.
    """
    out = {}
    for entry, spec in configured.items():
        named = spec.get("strategy") if isinstance(spec, Mapping) else getattr(spec, "strategy", None)
        name = str(named or entry)
        REGISTRY.check_names([name], f"strategies.{entry}" if name != entry else "strategies")
        out[entry] = name
    return out
