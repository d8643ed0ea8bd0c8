"""One registry mechanism for every pluggable kind: aggregators, encoders, sources, continual strategies.

A :class:`Registry` maps names to objects (classes or factories) with per-entry metadata, in the
style of timm: ``register`` as a decorator (or ``add`` as a call), ``entry``/``get`` by name,
``names(pattern)`` with shell-style wildcards. Every registry behaves the same way:

- a name taken by another object is an error naming both (the same definition registered again,
  e.g. a module imported twice or reloaded in a notebook, replaces the entry);
- an unknown name is one :class:`~feature_cache.errors.InvalidArgumentError` line with close matches
  and the registered names (:meth:`Registry.unknown_message`), the same wording for every kind;
- an object that breaks its kind's contract is refused at registration by the registry's ``check``,
  with a message naming it;
- names are written once, in the registering call.

**Built-ins are discovered, not listed.** A registry given a ``package`` and the name of its
registering function (``call="register_aggregator"``) finds its built-in names by reading the source
of every module of that package (``pkgutil`` + ``ast``: calls ``call("name", ...)`` with a literal
name, as a decorator or a plain call) without importing them; a module is imported the first time
one of its names is used (:meth:`Registry.entry`). So adding a built-in is one new file, and
listing names never imports torch or a heavy backend. A module whose registering call does not
give a literal name is imported when names are first listed.

**Plug-ins** (code outside the package), read at the first use of a registry and then on every use
(cheap when nothing changed):

- *entry points*: a distribution declares, in its ``pyproject.toml``::

      [project.entry-points."milcore.aggregators"]
      my_mil = "my_package.my_mil"        # entry-point name = registered name, value = module

  (groups ``milcore.aggregators``, ``milcore.encoders``, ``milcore.sources``,
  ``milcore.strategies``). The name is listed without importing anything; the module is imported
  when the name is first used and must register it.
- *an environment variable*: ``MILCORE_PLUGINS=my_mil,my_lab.encoders`` names modules (importable
  from ``sys.path``) that are imported at the first use of any registry (each time one of them is
  not yet imported); they register what they define with the public decorators.

Example:
    >>> REG = Registry("widget")
    >>> @REG.register("round", needs_coords=True)
    ... class Round: ...
    >>> REG.names("r*"), REG.entry("round").metadata["needs_coords"]
    (['round'], True)
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from feature_cache.errors import InvalidArgumentError

__all__ = ["PLUGIN_ENV", "Entry", "Registry", "RegistryChoices", "load_env_plugins", "scan_package"]

T = TypeVar("T")

#: Environment variable naming plug-in modules (comma-separated) imported at the first registry use.
PLUGIN_ENV = "MILCORE_PLUGINS"

#: What a registered name may look like (no spaces or commas: names travel in ``--models a,b`` lists).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object.

    Attributes:
        name: registry name.
        obj: the class or factory.
        summary: first line of the object's docstring.
        metadata: what the entry declares about itself (what it needs, what it is); read-only.
    """

    name: str
    obj: T
    summary: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)


def _summary(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _same_definition(a: Any, b: Any) -> bool:
    """The same object, or the same definition executed again (a module imported twice or reloaded)."""
    if a is b:
        return True
    qualname = getattr(a, "__qualname__", None)
    return qualname is not None and (getattr(a, "__module__", None), qualname) == (
        getattr(b, "__module__", None), getattr(b, "__qualname__", None)
    )


def load_env_plugins() -> None:
    """Import every module named in ``$MILCORE_PLUGINS`` that is not imported yet.

    Raises:
        InvalidArgumentError: a named module cannot be found (the variable and the name in the message).
    """
    raw = os.environ.get(PLUGIN_ENV, "")
    for module in (m.strip() for m in raw.split(",")):
        if not module or module in sys.modules:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
                raise  # the plug-in itself imports something missing: its own error
            raise InvalidArgumentError(f"{PLUGIN_ENV}: cannot import plug-in module {module!r} ({exc})") from exc


def _callee(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def scan_package(package: str, call: str) -> tuple[dict[str, list[str]], list[str]]:
    """Names registered by the modules of ``package``, found without importing them.

    Args:
        package: dotted package name (its ``__init__`` is not executed, only located).
        call: the registering function (``register_aggregator``); calls ``call("name", ...)`` count.

    Returns:
        ``name -> modules`` that register it, and the modules whose names cannot be read statically
        (no source file, or a registering call without a literal name): those must be imported.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidArgumentError(f"registry: {package!r} is not a package")
    found: dict[str, list[str]] = {}
    dynamic: list[str] = []
    for info in sorted(pkgutil.iter_modules(spec.submodule_search_locations), key=lambda i: i.name):
        if info.ispkg:
            continue
        module = f"{package}.{info.name}"
        path = Path(getattr(info.module_finder, "path", "")) / f"{info.name}.py"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:  # compiled-only or zipped install: ask the module itself
            dynamic.append(module)
            continue
        if call not in text:
            continue
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not (isinstance(node, ast.Call) and _callee(node.func) == call):
                continue
            first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.setdefault(first.value, [])
                if module not in found[first.value]:
                    found[first.value].append(module)
            elif module not in dynamic:
                dynamic.append(module)
    return found, dynamic


class Registry(Generic[T]):
    """Names -> objects with metadata; see the module docstring.

    Args:
        kind: what is registered, used in messages (``"aggregator"``, ``"encoder"``).
        package: package whose modules register the built-ins (discovered by :func:`scan_package`).
        call: name of the registering function those modules call (required with ``package``).
        plugin_group: entry-point group of plug-ins (``"milcore.aggregators"``).
        check: called with ``(name, obj, metadata)`` at registration; raises to refuse an object.
        builtins: extra ``name -> module`` built-ins (a module that registers the name when imported).
    """

    def __init__(
        self,
        kind: str,
        package: str | None = None,
        call: str | None = None,
        plugin_group: str | None = None,
        check: Callable[[str, Any, Mapping[str, Any]], None] | None = None,
        builtins: Mapping[str, str] | None = None,
    ) -> None:
        if package is not None and call is None:
            raise ValueError("a registry that scans a package needs the registering call's name")
        self.kind = kind
        self.package = package
        self.call = call
        self.plugin_group = plugin_group
        self._check = check
        self._extra_builtins = {k: [v] for k, v in (builtins or {}).items()}
        self._builtins: dict[str, list[str]] | None = None  # discovered on first use
        self._entry_points: dict[str, Any] | None = None
        self._entries: dict[str, Entry[T]] = {}

    # -- registering ----------------------------------------------------------------------------------
    def add(self, name: str, obj: T, **metadata: Any) -> T:
        """Register ``obj`` under ``name`` with ``metadata``; returns ``obj``.

        Raises:
            InvalidArgumentError: a malformed name, ``name`` taken by another object, or the check
                refuses ``obj``.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidArgumentError(
                f"{self.kind} name must be letters, digits, '_', '.', '+' or '-' (not starting with "
                f"'.', '+' or '-'), got {name!r}"
            )
        if name not in self._entries:
            self._load_builtin_before(name, obj)
        old = self._entries.get(name)
        if old is not None and not _same_definition(old.obj, obj):
            raise InvalidArgumentError(f"{self.kind} {name!r} is already registered (by {_where(old.obj)})")
        if self._check is not None:
            self._check(name, obj, metadata)
        self._entries[name] = Entry(name, obj, _summary(obj), MappingProxyType(dict(metadata)))
        return obj

    def _load_builtin_before(self, name: str, obj: Any) -> None:
        """Import the built-in module of ``name`` (unless ``obj`` comes from it), so a plug-in that takes a
        built-in name is refused now rather than breaking the built-in later."""
        modules = self.builtins().get(name) or []
        if getattr(obj, "__module__", None) in modules:
            return
        for module in modules:
            if module not in sys.modules:
                importlib.import_module(module)

    def register(self, name: str, **metadata: Any) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorator(obj: T) -> T:
            return self.add(name, obj, **metadata)

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests, plug-in reloads); unknown names are ignored.

        A built-in name stays listed (its module registers it again if imported again).
        """
        self._entries.pop(name, None)

    @contextmanager
    def scoped(self) -> Iterator[Registry[T]]:
        """Undo on exit what was registered inside (tests that register throwaway entries).

        Built-ins imported inside the block stay registered (their module is imported for good).
        """
        saved = dict(self._entries)
        try:
            yield self
        finally:
            kept = {n: e for n, e in self._entries.items() if n not in saved and self._is_builtin(e)}
            self._entries.clear()
            self._entries.update(saved)
            self._entries.update(kept)

    def _is_builtin(self, entry: Entry[T]) -> bool:
        # another object cannot take a built-in name (add imports the built-in first and refuses it)
        return entry.name in self.builtins()

    # -- discovery ------------------------------------------------------------------------------------
    def builtins(self) -> dict[str, list[str]]:
        """``name -> modules`` of the built-ins (scanned once)."""
        if self._builtins is None:
            found: dict[str, list[str]] = {}
            if self.package is not None:
                assert self.call is not None
                found, dynamic = scan_package(self.package, self.call)
                for module in dynamic:  # names only known to the module itself
                    importlib.import_module(module)
            for name, modules in self._extra_builtins.items():
                found.setdefault(name, []).extend(m for m in modules if m not in found.get(name, []))
            self._builtins = found
        return self._builtins

    def entry_points(self) -> dict[str, Any]:
        """``name -> entry point`` of the installed plug-ins of this kind (read once)."""
        if self._entry_points is None:
            self._entry_points = {}
            if self.plugin_group is not None:
                for ep in importlib.metadata.entry_points(group=self.plugin_group):
                    self._entry_points.setdefault(ep.name, ep)
        return self._entry_points

    def refresh(self) -> None:
        """Forget what was discovered (built-ins, entry points): read again on the next use."""
        self._builtins = None
        self._entry_points = None

    def _ensure(self) -> None:
        self.builtins()
        load_env_plugins()

    def _load(self, name: str) -> None:
        if name in self._entries:
            return
        modules = self.builtins().get(name)
        if modules:
            for module in modules:
                try:
                    importlib.import_module(module)
                except ModuleNotFoundError as exc:
                    if exc.name != module:
                        raise
                    raise InvalidArgumentError(
                        f"{self.kind} {name!r} is not available: module {module} is missing"
                    ) from exc
            if name not in self._entries:
                raise InvalidArgumentError(f"{self.kind} {name!r}: module {', '.join(modules)} does not register it")
            return
        ep = self.entry_points().get(name)
        if ep is not None:
            try:
                ep.load()
            except ImportError as exc:
                raise InvalidArgumentError(
                    f"{self.kind} {name!r}: plug-in entry point {ep.value!r} ({self.plugin_group}) "
                    f"cannot be imported: {exc}"
                ) from exc
            if name not in self._entries:
                raise InvalidArgumentError(
                    f"{self.kind} {name!r}: plug-in entry point {ep.value!r} ({self.plugin_group}) does not register it"
                )

    # -- lookup ---------------------------------------------------------------------------------------
    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names (registered, built in or installed plug-ins) matching a shell-style ``pattern``."""
        self._ensure()
        every = set(self._entries) | set(self.builtins()) | set(self.entry_points())
        return sorted(n for n in every if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``, importing its module when needed.

        Raises:
            InvalidArgumentError: an unknown name (close matches and the registered names listed), or
                a module that cannot be imported or does not register the name.
        """
        self._ensure()
        if not isinstance(name, str) or (name not in self._entries and name not in self.names()):
            raise InvalidArgumentError(self.unknown_message(name))
        self._load(name)
        return self._entries[name]

    def get(self, name: str) -> T:
        """The object registered under ``name`` (see :meth:`entry`)."""
        return self.entry(name).obj

    def entries(self, pattern: str = "*") -> list[Entry[T]]:
        """Entries matching ``pattern``, modules imported, in name order."""
        return [self.entry(n) for n in self.names(pattern)]

    def check_names(self, names: list[str] | tuple[str, ...], label: str | None = None) -> None:
        """Raise the one-line unknown-name error for the first of ``names`` that is not registered.

        Args:
            names: names to check (nothing is imported).
            label: prefix naming where they came from (``"--models"``).
        """
        known = set(self.names())
        for name in names:
            if name not in known:
                message = self.unknown_message(name)
                raise InvalidArgumentError(f"{label}: {message}" if label else message)

    def unknown_message(self, name: object) -> str:
        """``unknown <kind> 'x'; did you mean 'y'? (registered: a, b, c)``."""
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(known) or 'none'})"

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} loaded)"


class RegistryChoices:
    """A registry's names as an ``argparse`` ``type`` and ``choices``, read only when they are needed.

    ``add_argument("--source", type=c, choices=c, metavar="KIND", help="... %(choices)s")`` with
    ``c = RegistryChoices("feature_cache.sources.registry:REGISTRY")``: nothing is imported when the
    parser is built (``milcore --help`` stays cheap); the registry is read when the option is parsed
    (an unknown name gets the registry's one-line error with close matches) or its help is printed.

    Args:
        registry: a :class:`Registry`, or ``"module:attribute"`` naming one (imported on first use).
    """

    def __init__(self, registry: Registry[Any] | str) -> None:
        self._registry = registry

    @property
    def registry(self) -> Registry[Any]:
        """The registry (imported on first use)."""
        if isinstance(self._registry, str):
            module, _, attr = self._registry.partition(":")
            self._registry = getattr(importlib.import_module(module), attr)
        return self._registry

    def __call__(self, value: str) -> str:
        import argparse

        try:
            self.registry.check_names([value])
        except InvalidArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
        return value

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and value in self.registry.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.registry.names())

    def __repr__(self) -> str:
        return f"RegistryChoices({self._registry!r})"
