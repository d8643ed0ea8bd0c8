"""``milcore continual``: rehearsal-based continual MIL over a stream of tasks."""

from __future__ import annotations

import argparse
import logging

HELP = "rehearsal-based continual MIL over a stream of tasks"

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``continual`` subcommand."""
    from milcore.cli._types import add_config_options
    from milcore.continual.config import ContinualConfig

    p = subparsers.add_parser(
        "continual",
        help=HELP,
        description=HELP + ": every configured strategy trains task after task; writes continual.json "
        "(strategy -> average accuracy, forgetting, transfer, accuracy matrix) and report.html/.md.",
        parents=parents,
    )
    p.add_argument("--config", required=True, metavar="CONFIG.yaml", help="continual configuration (see experiments/)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the unfinished streams of an existing run in DIR")
    p.add_argument("--strategies", default=None, metavar="A,B",
                   help="run only these configured strategies (each entry names a registered strategy: "
                        "list_strategies())")  # fmt: skip
    add_config_options(p, ContinualConfig, ("seeds",), keep_unset=True, metavars={"seeds": "S,T"},
                       helps={"seeds": "training seeds, replacing the configured ones"})  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the configuration; returns the exit code."""
    from feature_cache.errors import UserError
    from milcore.continual.config import load_config
    from milcore.continual.runner import run_continual

    config = load_config(args.config)
    if args.seeds is not None:
        config = config.replace(seeds=args.seeds)
    from milcore.continual.strategies import strategy_names

    strategy_names(config.strategies)  # every configured strategy is registered, before any work
    names = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    unknown = [n for n in names or [] if n not in config.strategies]
    if unknown:
        raise UserError(f"--strategies: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not in the "
                        f"configuration (configured: {', '.join(config.strategies)})")  # fmt: skip
    summary = run_continual(config, args.out, resume=args.resume, strategies=names)
    for name, entry in summary.items():
        forgetting = entry["average_forgetting"]
        log.info("%-14s average accuracy %.3f  forgetting %s", name, entry["average_accuracy"],
                 "n/a" if forgetting is None else f"{forgetting:.3f}")  # fmt: skip
    log.info("wrote %s/continual.json and %s/report.html", args.out, args.out)
    return 0
