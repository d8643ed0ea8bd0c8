"""``milcore predict``: apply a trained checkpoint to a feature bank."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "apply a trained checkpoint to a feature bank"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``predict`` subcommand."""
    add_pending_parser(subparsers, parents, "predict", HELP)
