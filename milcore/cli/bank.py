"""``milcore bank``: inspect, verify, merge, convert, import and export feature banks."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "inspect, verify, merge, convert, import and export feature banks"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``bank`` subcommand."""
    add_pending_parser(subparsers, parents, "bank", HELP)
