"""``milcore train``: train a MIL bag classifier with patient-level cross-validation."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "train a MIL bag classifier with patient-level cross-validation"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``train`` subcommand."""
    add_pending_parser(subparsers, parents, "train", HELP)
