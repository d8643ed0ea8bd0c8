"""Step files (``experiments/*.yaml``): a named list of ``milcore`` steps, run in order by ``milcore run FILE``.

A step file drives the command line, so this runner lives in the CLI layer: every step is parsed by the
real ``milcore`` parser before the first one runs, and runs in-process through :func:`milcore.cli.main`
with the exit code it would have in a shell. (Library users call the library functions directly.)

Example (``experiments/demo.yaml``)::

    name: demo
    vars: {out: runs/demo}
    steps:
      - synth: {_: "{out}/cohort", task: aml, patients: 60, seed: 0, overwrite: true}
      - extract: {source: synthetic, input: "{out}/cohort", encoder: toy, out: "{out}/bank.h5"}
      - train: {bank: "{out}/bank.h5", cohort: "{out}/cohort/cohort.csv", task: aml, out: "{out}/abmil"}

Each step is one subcommand with its options as a mapping: ``key: value`` becomes ``--key value``
(underscores turn into dashes), ``true`` a bare flag, ``false`` or ``null`` leaves the option out, a
list a repeated option, and ``_`` the positional arguments. Values are scalars (or lists of scalars).
``{name}`` placeholders are filled from ``vars`` (which the command line can override with
``--set name=value``; ``{{`` and ``}}`` are literal braces). A failing step stops the experiment with
its exit code.

The whole file is checked before the first step runs: its top-level keys (:data:`TOP_LEVEL_KEYS`),
the variables, every placeholder, and every step's arguments, parsed by the real ``milcore`` parser
(unknown or abbreviated options, missing required ones, values of the wrong type). Errors name the
file, the step (number and command) and the key.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import string
import time
from pathlib import Path
from typing import Any

from feature_cache.config import did_you_mean
from feature_cache.errors import UserError

log = logging.getLogger(__name__)

#: Keys an experiment file may have at the top level.
TOP_LEVEL_KEYS = ("name", "description", "vars", "steps")

#: Commands an experiment may not run as a step (``run`` would nest experiments).
NOT_STEPS = ("run",)

_SCALARS = (str, int, float, bool)


def step_commands() -> tuple[str, ...]:
    """Subcommands a step may run: every ``milcore`` subcommand but :data:`NOT_STEPS`."""
    from milcore.cli import COMMANDS

    return tuple(c for c in COMMANDS if c not in NOT_STEPS)


def _close(key: str, choices: tuple[str, ...] | list[str]) -> str:
    return did_you_mean(key, choices)


def _fill(value: Any, variables: dict[str, str], where: str) -> Any:
    if isinstance(value, str):
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise UserError(f"{where}: malformed placeholder in {value!r} ({exc}; write {{{{ and }}}} for literal "
                            "braces)") from None  # fmt: skip
        for name in fields:
            if not name.isidentifier():
                raise UserError(f"{where}: placeholder {{{name}}} in {value!r} is not a variable name")
            if name not in variables:
                raise UserError(f"{where}: unknown placeholder {{{name}}}{_close(name, list(variables))} (vars: "
                                f"{', '.join(variables) or 'none'})")  # fmt: skip
        try:
            return value.format(**variables)
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            raise UserError(f"{where}: cannot fill {value!r} ({exc})") from None
    if isinstance(value, list):
        return [_fill(v, variables, where) for v in value]
    return value


def _text(value: Any) -> str:
    """A YAML scalar as a command-line word (``1.0e-3`` keeps YAML's reading, booleans lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def step_argv(command: str, options: dict[str, Any] | list[Any] | None) -> list[str]:
    """Turn one step's mapping into ``milcore`` arguments (the mapping is assumed checked)."""
    if options is None:
        return [command]
    if isinstance(options, list):  # raw arguments
        return [command, *map(_text, options)]
    argv = [command]
    positional = options.get("_", [])
    argv += [_text(p) for p in (positional if isinstance(positional, list) else [positional])]
    for key, value in options.items():
        if key == "_":
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            for v in value:
                argv += [flag, _text(v)]
        else:
            argv += [flag, _text(value)]
    return argv


def _check_options(options: Any, where: str) -> None:
    """A step's options: ``null``, a list of scalars (raw arguments) or a mapping name -> scalar/list."""
    if options is None:
        return
    if isinstance(options, list):
        bad = [v for v in options if not isinstance(v, _SCALARS)]
        if bad:
            raise UserError(f"{where}: raw arguments must be scalars, got {bad[0]!r}")
        return
    if not isinstance(options, dict):
        raise UserError(f"{where}: options must be a mapping 'key: value', got {type(options).__name__} "
                        f"{options!r:.60}")  # fmt: skip
    for key, value in options.items():
        if not isinstance(key, str) or not key or key.startswith("-") or any(c.isspace() for c in key):
            raise UserError(f"{where}: {key!r} is not an option name (write it as in --help, without dashes)")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if (v is not None and not isinstance(v, _SCALARS)) or (isinstance(value, list) and v is None):
                raise UserError(f"{where}: key {key!r}: a value must be a scalar or a list of scalars, got "
                                f"{type(v).__name__} {v!r:.60}")  # fmt: skip


def _subparser(parser: Any, argv: list[str]) -> Any:
    """The (sub)parser that parses ``argv``'s options: ``bench aggregators ...`` -> the aggregators parser."""
    for word in argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return parser


def _unknown_keys(parser: Any, options: Any, argv: list[str]) -> str:
    """``key 'epoch' (did you mean 'epochs'?)`` for the step keys the parser does not know."""
    if not isinstance(options, dict):
        return ""
    sub = _subparser(parser, argv)
    known = [o[2:].replace("-", "_") for o in sub._option_string_actions if o.startswith("--")]
    unknown = [k for k in options if k != "_" and k.replace("-", "_") not in known]
    return "; ".join(f"key {k!r} is not an option of 'milcore {' '.join(sub.prog.split()[1:])}'{_close(k, known)}"
                     for k in unknown)  # fmt: skip


def _parse_check(parser: Any, argv: list[str], where: str, options: Any = None) -> None:
    """Parse ``argv`` with the real ``milcore`` parser; its complaint becomes a UserError naming ``where``."""
    unknown = _unknown_keys(parser, options, argv)
    if unknown:
        raise UserError(f"{where}: {unknown}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
            return
        except SystemExit as exc:
            code = exc.code
    if code == 0:  # --help or --version
        raise UserError(f"{where}: asks for help or the version, which is not a step")
    message = err.getvalue().strip().splitlines()
    text = message[-1] if message else "invalid arguments"
    text = text.split("error: ", 1)[-1]
    text = text.rsplit(" (see '", 1)[0]
    raise UserError(f"{where}: {text} (milcore {' '.join(argv)})")


def load_steps(path: str | Path, overrides: dict[str, str] | None = None,
                    passthrough: list[str] | None = None) -> tuple[str, list[list[str]]]:  # fmt: skip
    """The experiment's name and the argument lists of its steps, every step checked by the real parser.

    Args:
        path: the YAML file.
        overrides: variable values from ``--set`` (each must name a variable of the file).
        passthrough: arguments appended to every step (e.g. ``-q``), included in the check.

    Raises:
        UserError: unreadable file, unknown top-level key, bad ``vars``, unknown step command, malformed
            step, unknown placeholder, or a step whose arguments ``milcore`` would refuse; each message
            names the file and, for a step, its number, command and key.
    """
    from milcore.cli import build_parser
    from milcore.cli._types import read_yaml

    path = Path(path)
    data = read_yaml(path)
    if "steps" not in data and "strategies" in data:
        raise UserError(f"{path}: a continual-learning configuration, not a step list; run it with "
                        f"'milcore continual --config {path} --out DIR'")  # fmt: skip
    unknown = [str(k) for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        hints = ", ".join(repr(k) + _close(k, TOP_LEVEL_KEYS) for k in unknown)
        raise UserError(f"{path}: unknown top-level key(s) {hints} (an experiment has {', '.join(TOP_LEVEL_KEYS)})")
    name = data.get("name", path.stem)
    if not isinstance(name, str | int | float) or isinstance(name, bool) or not str(name).strip():
        raise UserError(f"{path}: 'name' must be a non-empty string, got {name!r:.60}")
    raw_vars = data.get("vars") or {}
    if not isinstance(raw_vars, dict):
        raise UserError(f"{path}: 'vars' must be a mapping 'name: value', got {type(raw_vars).__name__}")
    variables: dict[str, str] = {}
    for k, v in raw_vars.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise UserError(f"{path}: vars: {k!r} is not a variable name (letters, digits, _)")
        if not isinstance(v, _SCALARS) or v is None:
            raise UserError(f"{path}: vars: {k!r} must be a scalar, got {type(v).__name__} {v!r:.60}")
        variables[k] = _text(v)
    for k, v in (overrides or {}).items():
        if k not in variables:
            raise UserError(f"--set {k}: {path} has no variable {k!r}{_close(k, list(variables))} (vars: "
                            f"{', '.join(variables) or 'none'})")  # fmt: skip
        variables[k] = v
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise UserError(f"{path}: needs a non-empty 'steps' list")
    commands = step_commands()
    parser = build_parser()
    out = []
    for i, step in enumerate(steps, start=1):
        where = f"{path}: step {i}"
        if not isinstance(step, dict) or len(step) != 1:
            raise UserError(f"{where}: each step is one mapping 'command: {{options}}', got {step!r:.60}")
        (command, options), = step.items()
        if command not in commands:
            raise UserError(f"{where}: unknown command {command!r}{_close(str(command), commands)} (use "
                            f"{', '.join(commands)})")  # fmt: skip
        where = f"{path}: step {i} ({command})"
        _check_options(options, where)
        filled = _fill(options, variables, where) if not isinstance(options, dict) else {
            k: _fill(v, variables, f"{where}: key {k!r}") for k, v in options.items()}  # fmt: skip
        argv = step_argv(command, filled)
        _parse_check(parser, [*argv, *(passthrough or [])], where, options)
        out.append(argv)
    return str(name), out


def run_steps(path: str | Path, overrides: dict[str, str] | None = None, dry_run: bool = False,
                   passthrough: list[str] | None = None) -> int:  # fmt: skip
    """Run every step in order; returns the first non-zero exit code, else 0."""
    from milcore.cli import main

    name, steps = load_steps(path, overrides, passthrough)  # the whole file is checked before step 1
    start = time.perf_counter()
    for i, argv in enumerate(steps, start=1):
        argv = [*argv, *(passthrough or [])]
        log.info("[%s %d/%d] milcore %s", name, i, len(steps), " ".join(argv))
        if dry_run:
            continue
        t0 = time.perf_counter()
        code = main(argv)
        if code != 0:
            log.error("[%s] step %d failed with exit code %d", name, i, code)
            return code
        log.info("[%s %d/%d] done in %.1f s", name, i, len(steps), time.perf_counter() - t0)
    log.info("[%s] finished %d steps in %.1f s", name, len(steps), time.perf_counter() - start)
    return 0
