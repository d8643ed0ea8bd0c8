"""Declared encoder options: name, type and allowed values, checked before anything is built or written.

Each encoder lists its options once, in :func:`~feature_cache.encoders.registry.register_encoder`
(``options=(EncoderOption("image_size", "int", low=32, high=1024), ...)``); keyword parameters of
the factory that are not declared are inferred from their defaults (type only, no range), so a
plug-in factory needs no declaration. Values may arrive as text (``--encoder-arg image_size=96``)
or as Python values (a config file); :meth:`EncoderOption.parse` converts and checks both and names
the option in every message, e.g. ``--encoder-arg image_size=100000: must be between 32 and 1024``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from feature_cache.errors import InvalidArgumentError

KINDS = ("int", "float", "str", "bool", "any")
#: Factory parameters that are not options (given by ``create_encoder`` itself).
RESERVED = ("weights", "device")
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_KIND_WORDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false"}


@dataclass(frozen=True)
class EncoderOption:
    """One encoder option.

    Attributes:
        name: keyword of the factory.
        kind: ``int``, ``float``, ``str``, ``bool`` or ``any`` (unchecked).
        low: smallest allowed value (numbers).
        high: largest allowed value (numbers).
        multiple_of: the value must be a multiple of this (ints).
        choices: allowed values (text).
        pattern: regular expression the whole text must match (text).
        optional: ``None`` is allowed (the factory's default is ``None``: "not given").
        help: one line for listings.
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    optional: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"encoder option {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {self.low:g} and {self.high:g}"
        return f">= {self.low:g}" if self.low is not None else f"<= {self.high:g}" if self.high is not None else ""

    def rule(self) -> str:
        """The allowed values in words (``a whole number between 32 and 1024``)."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        text = _KIND_WORDS.get(self.kind, "any value")
        if self._range():
            text += " " + self._range()
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        if self.pattern:
            text += f" matching {self.pattern}"
        return text

    def parse(self, value: Any, label: str = "encoder option") -> Any:
        """``value`` converted to this option's type and checked.

        Args:
            value: text (from the command line) or a Python value.
            label: how the option is called in messages (``--encoder-arg``).

        Raises:
            InvalidArgumentError: ``{label} {name}={value}: must be ...``.
        """
        where = f"{label} {self.name}={value}"
        if value is None:
            if self.optional or self.kind == "any":
                return None  # the factory's "not given"
            raise InvalidArgumentError(f"{where}: must be {self.rule()}")
        out = self._convert(value, where)
        if isinstance(out, int | float) and not isinstance(out, bool):
            if (self.low is not None and out < self.low) or (self.high is not None and out > self.high):
                raise InvalidArgumentError(f"{where}: must be {self.rule()}")
            if self.multiple_of and out % self.multiple_of:
                raise InvalidArgumentError(f"{where}: must be {self.rule()}")
        if isinstance(out, str):
            if self.choices is not None and out not in self.choices:
                raise InvalidArgumentError(f"{where}: must be one of {', '.join(self.choices)}")
            if self.pattern is not None and not re.fullmatch(self.pattern, out):
                raise InvalidArgumentError(f"{where}: must match {self.pattern}")
        return out

    def _convert(self, value: Any, where: str) -> Any:
        kind = self.kind
        if kind == "any":
            return value
        bad = InvalidArgumentError(f"{where}: expected {_KIND_WORDS[kind]}, got {value!r}")
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise bad
        if kind == "str":
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise bad
            return str(value)
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value.strip()) if kind == "float" else int(value.strip(), 10)
            except ValueError:
                raise bad from None
        if kind == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise bad
            return value
        if not isinstance(value, int | float) or value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgumentError(f"{where}: expected a finite number")
        return float(value)


def _inferred(param: inspect.Parameter) -> EncoderOption:
    default = param.default
    kind = next((k for t, k in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"))
                 if isinstance(default, t)), "any")  # fmt: skip
    return EncoderOption(param.name, kind)


def factory_options(
    name: str, factory: Callable[..., Any], declared: Sequence[EncoderOption]
) -> dict[str, EncoderOption]:
    """The options of a factory: its keyword parameters, with the declared ones' types and ranges.

    Raises:
        InvalidArgumentError: a declared option is not a parameter of the factory (a registration bug).
    """
    params = {p.name: p for p in inspect.signature(factory).parameters.values()
              if p.name not in RESERVED and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}  # fmt: skip
    by_name = {o.name: o for o in declared}
    stray = sorted(set(by_name) - set(params))
    if stray:
        raise InvalidArgumentError(f"encoder {name!r} declares options its factory does not take: {', '.join(stray)}")
    out = {}
    for p, param in params.items():
        option = by_name.get(p) or _inferred(param)
        out[p] = replace(option, optional=option.optional or param.default is None)
    return out


def check_options(
    encoder: str, known: Mapping[str, EncoderOption], values: Mapping[str, Any], label: str = "encoder option"
) -> dict[str, Any]:
    """Every value converted and checked against the encoder's options.

    Args:
        encoder: encoder name (for messages).
        known: the encoder's options.
        values: option name -> text or value.
        label: how options are called in messages (``--encoder-arg``).

    Returns:
        The converted values.

    Raises:
        InvalidArgumentError: an unknown option (the known ones listed) or a bad value.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        option = known.get(key)
        if option is None:
            has = f"its options: {', '.join(sorted(known))}" if known else "it takes none"
            raise InvalidArgumentError(f"{label} {key}: encoder {encoder!r} has no option {key!r} ({has})")
        out[key] = option.parse(value, label)
    return out
