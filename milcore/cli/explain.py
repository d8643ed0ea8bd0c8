"""``milcore explain``: per-patient galleries of the cells that drove each decision."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "per-patient galleries of the cells that drove each decision"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``explain`` subcommand."""
    add_pending_parser(subparsers, parents, "explain", HELP)
