"""``milcore run``: run an experiment described by a YAML file (a list of milcore steps)."""

from __future__ import annotations

import argparse

HELP = "run an experiment described by a YAML file (e.g. experiments/demo.yaml)"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``run`` subcommand."""
    p = subparsers.add_parser("run", help=HELP, description=HELP + ". See milcore/cli/steps.py for the format.",
                              parents=parents)  # fmt: skip
    p.add_argument("config", metavar="EXPERIMENT.yaml", help="experiment file")
    p.add_argument("--set", action="append", default=None, metavar="NAME=VALUE", help="override a variable")
    p.add_argument("--dry-run", action="store_true", help="print the steps without running them")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the experiment; returns the first failing step's exit code, else 0."""
    from milcore.cli._types import parse_overrides
    from milcore.cli.steps import run_steps

    overrides = {k: str(v) for k, v in parse_overrides(args.set or []).items()}
    passthrough = ["-q"] if getattr(args, "quiet", False) else []
    return run_steps(args.config, overrides, dry_run=args.dry_run, passthrough=passthrough)
