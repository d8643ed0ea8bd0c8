"""``milcore bench``: benchmark aggregators, bank I/O and extraction side by side."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "benchmark aggregators, bank I/O and extraction side by side"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``bench`` subcommand."""
    add_pending_parser(subparsers, parents, "bench", HELP)
