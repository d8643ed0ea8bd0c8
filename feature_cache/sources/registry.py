"""Registry of source kinds: ``create_source(kind, path, **options)``, ``list_sources(pattern)``.

One :class:`~feature_cache.registry.Registry` (see there for discovery and plug-ins): every module of
``feature_cache.sources`` that calls ``register_source("kind", ...)`` is a built-in, found without
importing it and imported on first use, so adding a source is one new file and importing
:mod:`feature_cache.sources` / listing kinds stays cheap (no OpenSlide, no torch). Plug-ins come
from the entry-point group ``milcore.sources`` or ``$MILCORE_PLUGINS``. A module registers its
class when imported, as a call or a decorator::

    register_source("synthetic", SyntheticSource)   # at the end of feature_cache/sources/synthetic.py

    @register_source("mine")
    class MySource(BagSource): ...
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.registry import Registry
from feature_cache.sources.base import BagSource

__all__ = ["REGISTRY", "create_source", "get_source_class", "list_sources", "register_source", "source_options"]

S = TypeVar("S", bound=type[BagSource])


def _check(kind: str, cls: Any, metadata: Mapping[str, Any]) -> None:
    """Refuse what is not a concrete :class:`BagSource` subclass (the protocol methods implemented)."""
    if not (inspect.isclass(cls) and issubclass(cls, BagSource)):
        raise InvalidArgumentError(f"source {kind!r}: {cls!r} is not a BagSource subclass")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise InvalidArgumentError(f"source {kind!r}: {cls.__qualname__} does not implement {', '.join(missing)}")


REGISTRY: Registry[type[BagSource]] = Registry(
    "source", package="feature_cache.sources", call="register_source", plugin_group="milcore.sources", check=_check
)


def register_source(kind: str, cls: S | None = None) -> Any:
    """Register ``cls`` under ``kind``; without ``cls``, a class decorator.

    Registering the same class twice is a no-op (a module imported again); another class under a
    taken name is an error. A class without its own ``kind`` takes ``kind``.

    Raises:
        InvalidArgumentError: ``kind`` is taken by another class, or ``cls`` is not a concrete BagSource.
    """
    if cls is None:
        return lambda c: register_source(kind, c)
    REGISTRY.add(kind, cls)
    if not cls.kind:  # the name is written once, in the registering call
        cls.kind = kind
    return cls


def list_sources(pattern: str = "*") -> list[str]:
    """Sorted source kinds (built in, registered or plug-ins) matching a shell-style ``pattern``; imports none."""
    return REGISTRY.names(pattern)


def get_source_class(kind: str) -> type[BagSource]:
    """The class registered under ``kind``, importing its module when needed.

    Raises:
        InvalidArgumentError: unknown kind (close matches listed), or its module is not available.
    """
    return REGISTRY.get(kind)


def source_options(kind: str) -> list[str]:
    """The keyword options a source kind's constructor takes (besides ``path``), sorted."""
    params = inspect.signature(get_source_class(kind)).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted(n for n, p in params.items() if n != "path" and p.kind in named)


def create_source(kind: str, path: str | Path, **options: Any) -> BagSource:
    """Build a source of ``kind`` reading ``path``.

    Args:
        kind: one of :func:`list_sources` (``crops``, ``fields``, ``slides``, ``synthetic``, ``bloodmnist``...).
        path: folder or file the source reads.
        **options: source-specific options (for example ``cells="rbc"`` for fields and slides).

    Raises:
        InvalidArgumentError: unknown kind or option.
        UserError: the path cannot be used.
    """
    cls = get_source_class(kind)
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = source_options(kind)
        unknown = sorted(set(options) - set(known))
        if unknown:
            has = f"its options: {', '.join(known)}" if known else "it takes none"
            raise InvalidArgumentError(f"source {kind!r} has no option {unknown[0]!r} ({has})")
    try:
        inspect.signature(cls).bind(path, **options)
    except TypeError as exc:
        raise InvalidArgumentError(f"source {kind!r}: {exc}") from exc
    source = cls(path, **options)
    if not isinstance(source, BagSource):  # pragma: no cover - guarded by register_source
        raise UserError(f"source {kind!r} built a {type(source).__name__}, not a BagSource")
    return source
