"""``milcore continual``: rehearsal-based continual MIL over a stream of tasks."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "rehearsal-based continual MIL over a stream of tasks"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``continual`` subcommand."""
    add_pending_parser(subparsers, parents, "continual", HELP)
