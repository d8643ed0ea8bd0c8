"""Argument types and small helpers shared by the subcommands (cheap imports only)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feature_cache.errors import UserError

#: Help of ``--folds`` (train, bench): the rule the split logic (``milcore.data.splits``) enforces.
FOLDS_HELP = ("cross-validation folds, at least 3: each fold tests on one part, validates (early stopping, "
              "calibration) on the next and trains on the rest; every class needs at least as many patients "
              "(default 5)")  # fmt: skip


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
    import yaml

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a configuration") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping at the top level")
    return data
