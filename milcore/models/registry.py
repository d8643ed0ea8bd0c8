"""Aggregator registry: ``register_aggregator`` / ``create_aggregator`` / ``list_aggregators`` (timm style).

One :class:`~feature_cache.registry.Registry` (see there for discovery and plug-ins): every module of
``milcore.models`` that calls ``register_aggregator("name", config=...)`` is a built-in, found without
importing it, so adding an aggregator is one new file; listing names imports neither torch nor the
models (importing ``milcore`` alone registers nothing). Plug-ins come from the entry-point group
``milcore.aggregators`` or ``$MILCORE_PLUGINS``.

What an aggregator needs (coordinates, a control class, epoch hooks, a dense path) is read from its
class attributes at registration into the entry's metadata; callers ask :func:`aggregator_needs` and
never decide by name.

Example:
    >>> from milcore.models import create_aggregator, list_aggregators
    >>> list_aggregators("*mil")
    ['abmil', 'amil', 'dsmil', 'graphmil', 'transmil']
    >>> model = create_aggregator("abmil", in_dim=512, num_classes=3, multi_branch=True)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from feature_cache.errors import InvalidArgumentError
from feature_cache.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from milcore.models.base import AggregatorConfig, MILAggregator

__all__ = [
    "REGISTRY",
    "AggregatorEntry",
    "AggregatorNeeds",
    "aggregator_needs",
    "control_class_of",
    "create_aggregator",
    "get_aggregator_entry",
    "list_aggregators",
    "register_aggregator",
]

M = TypeVar("M", bound="type[MILAggregator]")


@dataclass(frozen=True)
class AggregatorNeeds:
    """What an aggregator asks of whoever trains or runs it (declared by its class attributes).

    Attributes:
        coords: pass the cells' ``(N, 2)`` coordinates when the bank has them (graph MIL).
        control_class: config field holding the label of control bags (AMiL: ``"normal_class"``).
        hooks: :class:`~milcore.models.base.EpochContext` fields the trainer fills before each epoch.
        padded: has a dense ``forward_padded`` path.
        permutation_invariant: outputs do not depend on the order of a bag's rows.
        casts_input_first: reads the features only through one cast to the autocast dtype, so they may be
            handed over in that dtype.
    """

    coords: bool = False
    control_class: str | None = None
    hooks: frozenset[str] = frozenset()
    padded: bool = False
    permutation_invariant: bool = True
    casts_input_first: bool = False

    @classmethod
    def of(cls, model_class: type) -> AggregatorNeeds:
        """The needs a class declares (defaults for a plain ``nn.Module`` that declares nothing)."""
        return cls(
            coords=bool(getattr(model_class, "uses_coords", False)),
            control_class=getattr(model_class, "control_class_field", None),
            hooks=frozenset(getattr(model_class, "hook_requirements", frozenset())),
            padded=bool(getattr(model_class, "has_padded_path", False)),
            permutation_invariant=bool(getattr(model_class, "permutation_invariant", True)),
            casts_input_first=bool(getattr(model_class, "casts_input_first", False)),
        )


@dataclass(frozen=True)
class AggregatorEntry:
    """A registered aggregator: its name, config dataclass, module class, one-line summary and needs."""

    name: str
    config_class: type[AggregatorConfig]
    model_class: type[MILAggregator]
    summary: str
    needs: AggregatorNeeds


def _check(name: str, cls: Any, metadata: Mapping[str, Any]) -> None:
    """Refuse a config that is not a frozen AggregatorConfig dataclass or a class that is not a MILAggregator."""
    from milcore.models.base import AggregatorConfig, MILAggregator

    config = metadata.get("config")
    params = getattr(config, "__dataclass_params__", None)
    if not inspect.isclass(config) or params is None or not params.frozen or not issubclass(config, AggregatorConfig):
        raise InvalidArgumentError(
            f"config of aggregator {name!r} must be a @dataclass(frozen=True) subclass of AggregatorConfig, "
            f"got {getattr(config, '__qualname__', config)!r}"
        )
    if not (inspect.isclass(cls) and issubclass(cls, MILAggregator)):
        what = getattr(cls, "__qualname__", cls)
        raise InvalidArgumentError(f"aggregator {name!r}: {what!r} must subclass MILAggregator")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise InvalidArgumentError(f"aggregator {name!r}: {cls.__qualname__} does not implement {', '.join(missing)}")


REGISTRY: Registry[type[MILAggregator]] = Registry(
    "aggregator", package="milcore.models", call="register_aggregator", plugin_group="milcore.aggregators",
    check=_check,
)  # fmt: skip


def register_aggregator(name: str, config: type[AggregatorConfig]) -> Callable[[M], M]:
    """Class decorator registering an aggregator module under ``name`` with its config dataclass.

    Raises:
        InvalidArgumentError: ``name`` is already registered, the config is not a frozen
            :class:`~milcore.models.base.AggregatorConfig` dataclass, or the class is not a
            ``MILAggregator`` implementing ``pool``.
    """

    def decorator(cls: M) -> M:
        REGISTRY.add(name, cls, config=config, needs=AggregatorNeeds.of(cls))
        cls.aggregator_name = name
        cls.config_class = config
        return cls

    return decorator


def list_aggregators(pattern: str = "*") -> list[str]:
    """Sorted names of the aggregators matching an ``fnmatch`` pattern (``"*mil"``); imports none of them."""
    return REGISTRY.names(pattern)


def get_aggregator_entry(name: str) -> AggregatorEntry:
    """The registry entry of ``name`` (its module imported).

    Raises:
        InvalidArgumentError: for an unknown name, listing the close matches.
    """
    entry = REGISTRY.entry(name)
    return AggregatorEntry(name, entry.metadata["config"], entry.obj, entry.summary, entry.metadata["needs"])


def aggregator_needs(model: str | nn.Module | type) -> AggregatorNeeds:
    """What an aggregator needs, from its registered name, its class or a built model.

    Any ``nn.Module`` is accepted (a user's module that declares nothing needs nothing).

    Raises:
        InvalidArgumentError: an unknown name.
    """
    if isinstance(model, str):
        return get_aggregator_entry(model).needs
    return AggregatorNeeds.of(model if inspect.isclass(model) else type(model))


def control_class_of(model: nn.Module) -> int:
    """The label of control bags of a built model (its declared config field; 0 when it declares none)."""
    field = aggregator_needs(model).control_class
    value = getattr(getattr(model, "config", None), field, 0) if field else 0
    return int(value)


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
    # unknown fields (with close matches) and bad values: one InvalidArgumentError naming the aggregator and key
    config = entry.config_class.from_dict({"in_dim": in_dim, "num_classes": num_classes, **overrides},
                                          where=f"aggregator {name!r}")  # fmt: skip
    return entry.model_class(config)
