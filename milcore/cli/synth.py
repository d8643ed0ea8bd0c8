"""``milcore synth``: synthesize a blood-smear cohort."""

from __future__ import annotations

import argparse

from milcore.cli._pending import add_pending_parser

HELP = "synthesize a blood-smear cohort"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``synth`` subcommand."""
    add_pending_parser(subparsers, parents, "synth", HELP)
