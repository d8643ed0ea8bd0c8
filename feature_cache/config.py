"""One config convention for the engine: frozen dataclasses built from mappings and checked field by field.

A configuration is a ``@dataclass(frozen=True)`` subclass of :class:`Config`. A field's annotation is
its type; :func:`option` adds what a type cannot say (bounds, choices, a help line, how a value is
read from and written to a plain mapping). A config built from Python, from :meth:`Config.from_dict`
(a YAML or JSON mapping) or from command-line flags derived from its fields
(:func:`milcore.cli._types.add_config_options`) goes through the same checks, and every problem is one
:class:`~feature_cache.errors.InvalidArgumentError` line naming the key::

    @dataclass(frozen=True)
    class Fit(Config):
        '''How to fit.

        Attributes:
            epochs: maximum epochs.
            lr: learning rate.
        '''

        epochs: int = option(40, low=1)
        lr: float = option(5e-4, low=0, low_open=True)

    Fit.from_dict({"epoch": 3})   # InvalidArgumentError: unknown key(s) 'epoch' (did you mean 'epochs'?) ...
    Fit(lr=0)                     # InvalidArgumentError: lr must be > 0, got 0.0
    Fit.from_dict(Fit(epochs=3).to_dict()) == Fit(epochs=3)

Conversions made for every field, whatever the caller: a list becomes a tuple where the annotation is a
tuple, a mapping becomes the nested config where the annotation is a :class:`Config`, and a string
that spells a finite number is read as one where a float is expected (YAML 1.1 reads ``5e-4`` as text);
a whole number given for a float is accepted and kept as it is. Refused: ``bool`` where a number is
expected (YAML reads ``yes`` as true), non-finite numbers, any other type, values out of range or not
among the choices, unknown keys (with the closest valid name) and missing required keys.

The validators below (:func:`check_range`, :func:`check_choice`, :func:`check_type`,
:func:`check_keys`, :func:`did_you_mean`) are the engine's one copy: the aggregator configs, the
synthetic cohort, extraction and the learning-side configs all use them. Hand-written rather than
pydantic: a few hundred lines of standard library keep the frozen stdlib dataclasses the engine already
passes around, one-line messages with close-match hints, and no new compiled dependency.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from feature_cache.errors import InvalidArgumentError, UserError

__all__ = [
    "Config",
    "OptionSpec",
    "check_choice",
    "check_keys",
    "check_range",
    "check_type",
    "describe_type",
    "did_you_mean",
    "doc_attributes",
    "option",
    "option_spec",
    "unknown_keys_message",
]

C = TypeVar("C", bound="Config")

_META = "milcore_option"


# ------------------------------------------------------------------------------------------------ names


def did_you_mean(name: object, known: Iterable[str], cutoff: float = 0.6) -> str:
    """``" (did you mean 'epochs'?)"`` for the closest of ``known``, or ``""`` when none is close."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keys_message(unknown: Iterable[object], valid: Iterable[str], what: str = "key") -> str:
    """``unknown key(s) 'epoch' (did you mean 'epochs'?), 'x' (valid: a, b)``."""
    names = sorted(valid)
    hints = [repr(str(k)) + did_you_mean(str(k), names) for k in unknown]
    return f"unknown {what}(s) {', '.join(hints)} (valid: {', '.join(names) or 'none'})"


def check_keys(keys: Iterable[object], valid: Iterable[str], what: str = "key") -> None:
    """Raise :class:`InvalidArgumentError` for keys not in ``valid``, each with its closest valid name."""
    valid = list(valid)
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise InvalidArgumentError(unknown_keys_message(unknown, valid, what))


# ------------------------------------------------------------------------------------------- values


def _bound_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_range(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is a finite number within the bounds.

    Args:
        name: the key named in the message.
        value: the value to check (``bool`` is refused: YAML reads ``yes`` as true).
        low, high: inclusive bounds (``None``: unbounded on that side).
        integer: also require a whole number.
        low_open, high_open: make that bound exclusive.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise InvalidArgumentError(f"{name} must be {'a whole number' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise InvalidArgumentError(f"{name} must be {_bound_text(low, high, low_open, high_open)}, got {value!r}")


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is one of ``choices`` (with the closest one)."""
    choices = tuple(choices)
    if value not in choices:
        hint = did_you_mean(value, [c for c in choices if isinstance(c, str)])
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")


def describe_type(hint: Any) -> str:
    """How a message names values of an annotation: ``int`` -> ``a whole number``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple or hint is tuple:
        return "a list"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if inspect.isclass(hint) and issubclass(hint, Config):
        return f"a mapping of {hint.__name__} fields"
    return f"a {getattr(hint, '__name__', hint)}"


def _float(name: str, value: Any) -> float:
    """A number; whole numbers are kept as given (``1`` stays ``1``: the JSON of a config, which fingerprints
    some inputs, is what it was before this convention), text spelling a number is read as a float."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidArgumentError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
    return value


def check_type(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` and converted (see the module docstring).

    Handles ``bool``, ``int``, ``float``, ``str``, ``X | None``, ``tuple[T, ...]``, ``tuple[A, B]``,
    ``dict[K, V]``/``Mapping``, ``Literal``, nested :class:`Config` classes (from a mapping), other
    classes (an instance) and ``Any``.

    Raises:
        InvalidArgumentError: naming ``name``, what was expected and what was given.
    """
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check_type(name, value, options[0])
        for a in options:
            try:
                return check_type(name, value, a)
            except InvalidArgumentError:
                continue
        raise InvalidArgumentError(f"{name} must be {describe_type(hint)}, got {value!r}")
    if origin is typing.Literal:
        check_choice(name, value, args)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidArgumentError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    if hint is float:
        return _float(name, value)
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{name} must be a string, got {value!r}")
        return value
    if origin is tuple or hint is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise InvalidArgumentError(f"{name} must be a list, got {value!r}")
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value))
        if len(value) != len(args):
            raise InvalidArgumentError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(check_type(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(f"{name} must be a mapping, got {value!r}")
        key_type, value_type = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if key_type is str and not isinstance(k, str):
                raise InvalidArgumentError(f"{name} keys must be strings, got {k!r}")
            out[k] = check_type(f"{name}.{k}", v, value_type)
        return out
    if inspect.isclass(hint) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(f"{name} must be {describe_type(hint)}, got {value!r}")
        return hint.from_dict(value, where=name)
    if inspect.isclass(hint):
        if not isinstance(value, hint):
            raise InvalidArgumentError(f"{name} must be {describe_type(hint)}, got {value!r}")
        return value
    return value


# ------------------------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class OptionSpec:
    """What a field's type does not say (set with :func:`option`).

    Attributes:
        low, high: inclusive bounds of a number (of each item of a tuple of numbers).
        low_open, high_open: make that bound exclusive.
        choices: allowed values (of each item of a tuple), or a function returning them (lazy lists,
            e.g. a registry's names).
        min_items: fewest items of a tuple.
        help: a help line (else the class docstring's ``Attributes`` entry).
        load: converts a value given in another accepted form (e.g. ``"0-45,46-59"``) before the type
            check; must return values of the right type unchanged.
        dump: converts the value for :meth:`Config.to_dict` (the inverse of ``load``).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | Callable[[], Iterable[Any]] | None = None
    min_items: int | None = None
    help: str | None = None
    load: Callable[[Any], Any] | None = None
    dump: Callable[[Any], Any] | None = None

    def allowed(self) -> tuple[Any, ...] | None:
        """The choices, resolved."""
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def check(self, name: str, value: Any) -> None:
        """Bounds, choices and length of an already type-checked value."""
        items = value if isinstance(value, tuple) else (value,)
        if self.min_items is not None and isinstance(value, tuple) and len(value) < self.min_items:
            raise InvalidArgumentError(f"{name} must have at least {self.min_items} item(s), got {list(value)!r}")
        allowed = self.allowed()
        for item in items:
            if item is None:
                continue
            if self.low is not None or self.high is not None:
                check_range(name, item, self.low, self.high, isinstance(item, numbers.Integral),
                            low_open=self.low_open, high_open=self.high_open)  # fmt: skip
            if allowed is not None:
                check_choice(name, item, allowed)


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[Any, ...] | Callable[[], Iterable[Any]] | None = None,
    min_items: int | None = None,
    help: str | None = None,
    load: Callable[[Any], Any] | None = None,
    dump: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field with bounds, choices, help and conversions (see :class:`OptionSpec`)."""
    spec = OptionSpec(low, high, low_open, high_open, tuple(choices) if isinstance(choices, (list, tuple)) else choices,
                      min_items, help, load, dump)  # fmt: skip
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_META: spec})


def option_spec(f: dataclasses.Field) -> OptionSpec:
    """The :class:`OptionSpec` of a field (an empty one for a plain field)."""
    return f.metadata.get(_META) or OptionSpec()


_ATTR_LINE = re.compile(r"^(?P<names>\w+(?:\s*[,/]\s*\w+)*)(?:\s*\([^)]*\))?:\s*(?P<text>.*)$")


def doc_attributes(cls: type) -> dict[str, str]:
    """Field -> text of the Google-style ``Attributes:`` sections of ``cls`` and its bases (own first)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = inspect.cleandoc(klass.__dict__.get("__doc__") or "").splitlines()
        if "Attributes:" not in (line.strip() for line in lines):
            continue
        start = [line.strip() for line in lines].index("Attributes:") + 1
        names: list[str] = []
        for line in lines[start:]:
            if not line.strip():
                names = []
                continue
            if not line.startswith(" "):
                break
            match = _ATTR_LINE.match(line.strip()) if len(line) - len(line.lstrip()) <= 4 else None
            if match:
                names = re.split(r"\s*[,/]\s*", match["names"])
                for name in names:
                    out[name] = match["text"].strip()
            else:
                for name in names:
                    out[name] = f"{out[name]} {line.strip()}"
    return out


def _plain(value: Any) -> Any:
    """Tuples -> lists, configs and dataclasses -> mappings, recursively (JSON/YAML-ready)."""
    if isinstance(value, Config):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# ------------------------------------------------------------------------------------------- Config


@dataclass(frozen=True)
class Config:
    """Base of every configuration dataclass (see the module docstring).

    Subclasses are ``@dataclass(frozen=True)``; they declare cross-field rules in :meth:`validate`
    (called after every field has been checked) and name their keys in messages with
    :attr:`config_key` (``"training option"`` -> ``unknown training option(s) 'epoch'``).
    """

    config_key: ClassVar[str] = "key"

    def __post_init__(self) -> None:
        """Check and convert every field, then :meth:`validate`; raises :class:`InvalidArgumentError`."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = type(self).check_value(f.name, value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self.validate()

    def validate(self) -> None:
        """Rules between fields (override; raise :class:`InvalidArgumentError` naming the keys)."""
        return None

    @classmethod
    def check_value(cls, name: str, value: Any) -> Any:
        """One field's value checked (type, bounds, choices) and converted, as construction does it."""
        f = cls.__dataclass_fields__[name]
        spec = option_spec(f)
        if spec.load is not None and value is not None:
            try:
                value = spec.load(value)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"{name}: {exc}") from None
        value = check_type(name, value, _hints(cls)[name])
        spec.check(name, value)
        return value

    @classmethod
    def field_names(cls) -> list[str]:
        """The fields, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field -> one help line: the field's ``help=`` or its docstring ``Attributes`` entry."""
        doc = doc_attributes(cls)
        return {f.name: option_spec(f).help or doc.get(f.name, "") for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls, names: Iterable[str] | None = None) -> dict[str, Any]:
        """Field -> default value (fields without one are left out); only ``names`` when given, so that a
        nested config's default factory runs only when that field is asked for."""
        wanted = None if names is None else set(names)
        out = {}
        for f in dataclasses.fields(cls):
            if wanted is not None and f.name not in wanted:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, where: str | None = None) -> C:
        """Build from a mapping (a YAML/JSON document, a CLI's options, a notebook's dict).

        Args:
            data: field -> value; nested configs as nested mappings, tuples as lists.
            where: prefixed to every message (a file path, ``train``).

        Raises:
            InvalidArgumentError: not a mapping, an unknown key (with the closest valid one), a
                missing required key or a bad value, naming the key.
        """
        try:
            if not isinstance(data, Mapping):
                raise InvalidArgumentError(f"expected a mapping of {cls.config_key}s, got {type(data).__name__}")
            names = cls.field_names()
            check_keys(data, names, cls.config_key)
            required = [f.name for f in dataclasses.fields(cls)
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # fmt: skip
            missing = [n for n in required if n not in data]
            if missing:
                raise InvalidArgumentError(f"missing {cls.config_key}(s) {', '.join(map(repr, missing))}")
            return cls(**{str(k): v for k, v in data.items()})
        except InvalidArgumentError as exc:
            if where:
                raise InvalidArgumentError(f"{where}: {exc}") from None
            raise

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (lists, mappings, numbers, strings) that :meth:`from_dict` reads back equal."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            dump = option_spec(f).dump
            out[f.name] = _plain(dump(value) if dump is not None and value is not None else value)
        return out

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (checked like a new config; unknown keys refused)."""
        check_keys(changes, self.field_names(), self.config_key)
        return dataclasses.replace(self, **changes)


def read_yaml(path: str | os.PathLike[str], *, what: str = "YAML file", mapping: bool = True) -> Any:
    """The content of a YAML file, every problem a one-line :class:`UserError` naming the file.

    The one YAML reader of the engine (experiments, ``--config`` files, continual configurations, run
    folders' ``config.yaml``, synthetic cohort configurations). A UTF-8 byte-order mark is accepted.

    Args:
        path: the file.
        what: what the file is, for messages (``"run configuration"``).
        mapping: require a mapping at the top level.

    Raises:
        UserError: a missing file or a folder, text that is not UTF-8 or not YAML (with the line), nesting
            too deep, or (``mapping``) a top level that is not a mapping.
    """
    import yaml

    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: {what} not found")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a {what}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = yaml.safe_load(f.read())
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a {what}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    if mapping and not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping at the top level of the {what}")
    return data
