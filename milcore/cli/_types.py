"""Argument types and small helpers shared by the subcommands (cheap imports only).

:func:`add_config_options` derives flags from config fields (:mod:`feature_cache.config`): each flag's
type, range, choices, default and help come from its field, so a default is declared once, in the
config, and a bad value is refused with the config's own message.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from feature_cache.config import Config, option_spec
from feature_cache.errors import InvalidArgumentError, UserError

#: Help of ``--folds`` (train, bench): the rule the split logic (``milcore.data.splits``) enforces.
FOLDS_HELP = ("cross-validation folds, at least 3: each fold tests on one part, validates (early stopping, "
              "calibration) on the next and trains on the rest; every class needs at least as many "
              "patients")  # fmt: skip


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _number(text: str, ok: Callable[[float], bool], rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    return _number(text, lambda v: v > 0, "> 0")


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    return _number(text, lambda v: 0 <= v <= 1, "in [0, 1]")


def non_negative(text: str) -> float:
    """An argparse type: a number >= 0."""
    return _number(text, lambda v: v >= 0, ">= 0")


def _scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["hidden_dim=256", "dropout=0.1"]`` -> ``{"hidden_dim": 256, "dropout": 0.1}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _scalar(value)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a one-line error for a missing or malformed file."""
    from feature_cache.config import read_yaml as read

    return read(path)


class _Switch(argparse.BooleanOptionalAction):
    """``--x`` / ``--no-x`` whose help is exactly the one given (no second default)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        help_text = kwargs.get("help")
        super().__init__(*args, **kwargs)
        self.help = help_text


class _LazyChoices(Sequence):
    """argparse ``choices`` computed on first use (membership test, iteration or help), not when declared."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._values: tuple[Any, ...] | None = None

    def _all(self) -> tuple[Any, ...]:
        if self._values is None:
            self._values = tuple(self._make())
        return self._values

    def __getitem__(self, i: Any) -> Any:
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()


def _show(value: Any) -> str:
    """A default as a user types it: ``0.0005``, ``abmil,amil``, ``on``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _parse_scalar(text: str, hint: Any) -> Any:
    """Command-line text -> a value of ``hint`` (before the config's checks)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return text


def config_type(cls: type[Config], name: str) -> Callable[[str], Any]:
    """An argparse type for field ``name`` of ``cls``: parsed, then checked as the config checks it.

    Tuple fields take comma-separated values (``0,0.25,0.5``); ``none`` or an empty text is an empty tuple.
    """
    hint = typing.get_type_hints(cls)[name]
    is_tuple = typing.get_origin(hint) is tuple

    def parse(text: str) -> Any:
        if is_tuple:
            items = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
            item_hint = typing.get_args(hint)[0] if typing.get_args(hint) else str
            value: Any = tuple(_parse_scalar(t, item_hint) for t in items)
        else:
            value = _parse_scalar(text, hint)
        try:
            return cls.check_value(name, value)
        except InvalidArgumentError as exc:
            message = str(exc)
            raise argparse.ArgumentTypeError(message[len(name):].lstrip(": ") if message.startswith(name) else
                                             message) from None  # fmt: skip
    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config: type[Config] | Config,
    names: Sequence[str],
    *,
    flags: Mapping[str, str | Sequence[str]] | None = None,
    helps: Mapping[str, str] | None = None,
    metavars: Mapping[str, str] | None = None,
    keep_unset: bool = False,
) -> None:
    """Add one flag per config field; type, range, choices, default and help come from the field.

    Args:
        parser: the (sub)parser or argument group.
        config: the config class, or an instance whose values are the flags' defaults (a command whose
            defaults differ from the class's, declared once as that instance, e.g. ``BENCH_TRAIN``).
        names: the fields to expose; the flag is ``--field-name`` and ``dest`` the field name.
        flags: other option strings of a field (``{"bel_weight": ("--bel", "--bel-weight")}``).
        helps: help lines replacing the field's docstring entry.
        metavars: metavars of value flags.
        keep_unset: flags default to ``None`` (a value given elsewhere, e.g. a ``--config`` file, is kept
            unless the flag is given); the help still shows the config's default.

    Every action added carries ``config_field = (config class, field name)`` and ``config_default``, so a
    test can check that each flag's default is the field's.
    """
    cls = config if isinstance(config, type) else type(config)
    defaults = cls.defaults(names) if isinstance(config, type) else {n: getattr(config, n) for n in cls.field_names()}
    doc = cls.field_help()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in names:
        if name not in fields:
            raise ValueError(f"{cls.__name__} has no field {name!r}")
        hint = hints[name]
        option_strings = (flags or {}).get(name) or f"--{name.replace('_', '-')}"
        option_strings = [option_strings] if isinstance(option_strings, str) else list(option_strings)
        default = defaults.get(name)
        text = ((helps or {}).get(name) or doc.get(name) or name).replace("``", "").rstrip(".")
        if default is not None and default != ():
            dump = option_spec(fields[name]).dump
            text += f" (default {_show(dump(default) if dump else default)})"
        kwargs: dict[str, Any] = {"dest": name, "help": text.replace("%", "%%"),
                                  "default": None if keep_unset else default}  # fmt: skip
        if hint is bool:
            action = parser.add_argument(*option_strings, action=_Switch, **kwargs)
        else:
            if typing.get_origin(hint) in (dict, Mapping) or hint in (dict, Mapping):
                raise ValueError(f"{cls.__name__}.{name} is a mapping: give it as KEY=VALUE options instead")
            spec = option_spec(fields[name])
            if callable(spec.choices) and typing.get_origin(hint) is not tuple:
                # a lazy list (e.g. the metric table's names): resolved when parsed or when help is shown,
                # so building the parser (``milcore --help``) imports nothing heavy
                kwargs["choices"] = _LazyChoices(spec.choices)
                flag = option_strings[0].lstrip("-").replace("-", "_").upper()
                kwargs["metavar"] = (metavars or {}).get(name) or flag
                kwargs["help"] += " (one of: %(choices)s)"
            elif typing.get_origin(hint) is not tuple and (choices := spec.allowed()) is not None:  # tuples: lazy
                kwargs["choices"] = choices
            elif (metavars or {}).get(name):
                kwargs["metavar"] = metavars[name]
            elif typing.get_origin(hint) is tuple:
                kwargs["metavar"] = "A,B"
            else:
                kwargs["metavar"] = option_strings[0].lstrip("-").replace("-", "_").upper()
            action = parser.add_argument(*option_strings, type=config_type(cls, name), **kwargs)
        action.config_field = (cls, name)  # type: ignore[attr-defined]
        action.config_default = default  # type: ignore[attr-defined]


def config_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The options of ``names`` given on the command line (those left unset, ``None``, are omitted)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
