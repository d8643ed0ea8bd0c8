"""Registry of source kinds: ``create_source(kind, path, **options)``, ``list_sources(pattern)``.

Built-in kinds live in their own modules and are imported on first use, so importing
:mod:`feature_cache.sources` stays cheap. A module registers its class when imported::

    register_source("synthetic", SyntheticSource)   # at the end of feature_cache/sources/synthetic.py
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from pathlib import Path
from typing import Any

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources.base import BagSource

_REGISTRY: dict[str, type[BagSource]] = {}

# kind -> module that registers it when imported (lazy, so no heavy import happens up front)
BUILTIN_SOURCES: dict[str, str] = {
    "crops": "feature_cache.sources.crops",
    "fields": "feature_cache.sources.fields",
    "slides": "feature_cache.sources.slides",
    "synthetic": "feature_cache.sources.synthetic",
    "bloodmnist": "feature_cache.sources.bloodmnist",
}


def register_source(kind: str, cls: type[BagSource]) -> type[BagSource]:
    """Register ``cls`` under ``kind``.

    Registering the same class twice is a no-op (a module imported again); another class under a
    taken name is an error.

    Raises:
        InvalidArgumentError: ``kind`` is taken by another class, or ``cls`` is not a BagSource.
    """
    if not (inspect.isclass(cls) and issubclass(cls, BagSource)):
        raise InvalidArgumentError(f"source {kind!r}: {cls!r} is not a BagSource subclass")
    old = _REGISTRY.get(kind)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise InvalidArgumentError(f"source kind {kind!r} is already registered by {old.__module__}.{old.__name__}")
    _REGISTRY[kind] = cls
    return cls


def list_sources(pattern: str = "*") -> list[str]:
    """Sorted source kinds (registered or built in) matching a shell-style ``pattern``."""
    return sorted(k for k in set(_REGISTRY) | set(BUILTIN_SOURCES) if fnmatch.fnmatchcase(k, pattern))


def get_source_class(kind: str) -> type[BagSource]:
    """The class registered under ``kind``, importing its built-in module when needed.

    Raises:
        InvalidArgumentError: unknown kind, or its module is not available.
    """
    if kind not in _REGISTRY and kind in BUILTIN_SOURCES:
        module = BUILTIN_SOURCES[kind]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise InvalidArgumentError(f"source {kind!r} is not available: module {module} is missing") from exc
    if kind not in _REGISTRY and kind in BUILTIN_SOURCES:
        raise InvalidArgumentError(
            f"source {kind!r}: module {BUILTIN_SOURCES[kind]} does not register it yet "
            f"(it should call register_source({kind!r}, ...))"
        )
    if kind not in _REGISTRY:
        raise InvalidArgumentError(f"unknown source {kind!r}; known: {', '.join(list_sources())}")
    return _REGISTRY[kind]


def create_source(kind: str, path: str | Path, **options: Any) -> BagSource:
    """Build a source of ``kind`` reading ``path``.

    Args:
        kind: one of :func:`list_sources` (``crops``, ``fields``, ``slides``, ``synthetic``).
        path: folder or file the source reads.
        **options: source-specific options (for example ``cells="rbc"`` for fields and slides).

    Raises:
        InvalidArgumentError: unknown kind or option.
        UserError: the path cannot be used.
    """
    cls = get_source_class(kind)
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        known = sorted(n for n, p in params.items() if n != "path" and p.kind in named)
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
