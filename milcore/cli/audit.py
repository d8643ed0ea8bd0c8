"""``milcore audit``: age/sex/site bias audits of a run, and imbalance experiments."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "age/sex/site bias audits of a run, and imbalance experiments"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``audit`` subcommand."""
    add_pending_parser(subparsers, parents, "audit", HELP)
