"""``milcore run``: run an experiment described by a YAML file."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "run an experiment described by a YAML file"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``run`` subcommand."""
    add_pending_parser(subparsers, parents, "run", HELP)
