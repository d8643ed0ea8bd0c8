"""``milcore extract``: pre-extract cell features into a feature bank."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "pre-extract cell features from crops, smear fields, slides or the synthetic cohort into a feature bank"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``extract`` subcommand."""
    add_pending_parser(subparsers, parents, "extract", HELP)
