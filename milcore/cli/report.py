"""``milcore report``: work on run folders' reports.

Forms::

    milcore report merge RUN_0 RUN_1 ... --out RUN [--overwrite]

``merge`` joins the one-fold runs of ``milcore train --fold K`` (a job array, one fold per task) into
the run folder the single-process ``milcore train`` writes (:func:`milcore.crossval.merge.merge_runs`).
"""

from __future__ import annotations

import argparse
import logging

HELP = "assemble run folders: join one-fold runs (train --fold K) into the whole run"

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``report`` subcommand and its actions."""
    report = subparsers.add_parser("report", help=HELP, description=HELP, parents=parents)
    sub = report.add_subparsers(dest="report_command", metavar="ACTION", parser_class=type(report))
    report.set_defaults(func=run, report_command=None)
    text = ("join the run folders of 'milcore train --fold K' (every fold once, same inputs and options) into one "
            "run folder: metrics with CIs, predictions, attention, report, passport")  # fmt: skip
    p = sub.add_parser("merge", help=text, description=text, parents=parents)
    p.add_argument("runs", nargs="+", metavar="RUN", help="one-fold run folders, any order")
    p.add_argument("--out", required=True, help="the run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; returns the exit code."""
    from feature_cache.errors import InvalidArgumentError

    if args.report_command != "merge":
        raise InvalidArgumentError("milcore report: choose an action: merge")
    from milcore.crossval.merge import merge_runs

    cv = merge_runs(args.runs, args.out, overwrite=args.overwrite)
    log.info("%s", cv.summary())
    log.info("report: %s/report.html  metrics: %s/metrics.json", args.out, args.out)
    return 0
