"""Shared parser for subcommands whose implementation has not landed yet."""

from __future__ import annotations

import argparse

from feature_cache.errors import UserError


def add_pending_parser(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    """Register ``name`` with its help text; running it explains that it is not available yet."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text, parents=parents)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def _run(args: argparse.Namespace) -> int:
        raise UserError(f"'{name}' is not available in this version yet")

    parser.set_defaults(func=_run)
    return parser
