"""Experiments as YAML: a named list of ``milcore`` steps, run in order by ``milcore run FILE``.

Example (``experiments/demo.yaml``)::

    name: demo
    vars: {out: runs/demo}
    steps:
      - synth: {_: "{out}/cohort", task: aml, patients: 60, seed: 0, overwrite: true}
      - extract: {source: synthetic, input: "{out}/cohort", encoder: toy, out: "{out}/bank.h5"}
      - train: {bank: "{out}/bank.h5", cohort: "{out}/cohort/cohort.csv", task: aml, out: "{out}/abmil"}

Each step is one subcommand with its options as a mapping: ``key: value`` becomes ``--key value``
(underscores turn into dashes), ``true`` a bare flag, a list a repeated option, and ``_`` the
positional arguments. ``{name}`` placeholders are filled from ``vars`` (which the command line can
override with ``--set name=value``). A failing step stops the experiment with its exit code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from feature_cache.errors import UserError

log = logging.getLogger(__name__)

STEP_COMMANDS = ("synth", "extract", "bank", "train", "predict", "explain", "audit", "continual", "bench")


def _fill(value: Any, variables: dict[str, str], where: str) -> Any:
    if isinstance(value, str):
        try:
            return value.format(**variables)
        except KeyError as exc:
            raise UserError(f"{where}: unknown placeholder {{{exc.args[0]}}} (vars: {', '.join(variables)})") from None
    if isinstance(value, list):
        return [_fill(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, variables, where) for k, v in value.items()}
    return value


def step_argv(command: str, options: dict[str, Any] | list[Any] | None) -> list[str]:
    """Turn one step's mapping into ``milcore`` arguments."""
    if options is None:
        return [command]
    if isinstance(options, list):  # raw arguments
        return [command, *map(str, options)]
    argv = [command]
    positional = options.get("_", [])
    argv += [str(p) for p in (positional if isinstance(positional, list) else [positional])]
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
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def load_experiment(path: str | Path, overrides: dict[str, str] | None = None) -> tuple[str, list[list[str]]]:
    """The experiment's name and the argument lists of its steps.

    Raises:
        UserError: unreadable file, unknown step command, malformed step, unknown placeholder.
    """
    from milcore.cli._types import read_yaml

    path = Path(path)
    data = read_yaml(path)
    name = str(data.get("name", path.stem))
    variables = {k: str(v) for k, v in (data.get("vars") or {}).items()}
    variables.update(overrides or {})
    steps = data.get("steps")
    if steps is None and "strategies" in data:
        raise UserError(f"{path}: a continual-learning configuration, not a step list; run it with "
                        f"'milcore continual --config {path} --out DIR'")  # fmt: skip
    if not isinstance(steps, list) or not steps:
        raise UserError(f"{path}: needs a non-empty 'steps' list")
    out = []
    for i, step in enumerate(steps, start=1):
        where = f"{path}: step {i}"
        if not isinstance(step, dict) or len(step) != 1:
            raise UserError(f"{where}: each step is one mapping 'command: {{options}}'")
        (command, options), = step.items()
        if command not in STEP_COMMANDS:
            raise UserError(f"{where}: unknown command {command!r} (use {', '.join(STEP_COMMANDS)})")
        out.append(step_argv(command, _fill(options, variables, where)))
    return name, out


def run_experiment(path: str | Path, overrides: dict[str, str] | None = None, dry_run: bool = False,
                   passthrough: list[str] | None = None) -> int:  # fmt: skip
    """Run every step in order; returns the first non-zero exit code, else 0."""
    from milcore.cli import main

    name, steps = load_experiment(path, overrides)
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
