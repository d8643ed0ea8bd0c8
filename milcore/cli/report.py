"""``milcore report``: work on run folders' reports.

Forms::

    milcore report merge RUN_0 RUN_1 ... --out RUN [--overwrite]
    milcore report merge BENCH_0 BENCH_1 ... --out BENCH [--overwrite]

``merge`` joins the one-fold runs of ``milcore train --fold K`` (a job array, one fold per task) into
the run folder the single-process ``milcore train`` writes (:func:`milcore.crossval.merge.merge_runs`);
given benchmark folders (``bench.json``: ``milcore bench aggregators --fold K`` or ``--seeds S``), it joins
them into the folder of the whole benchmark (:func:`milcore.bench.merge.merge_benches`). One command
for both: a job array's last step is the same whatever the array ran.
"""

from __future__ import annotations

import argparse
import logging

HELP = "assemble run folders: join one-fold runs (train --fold K, bench aggregators --fold K) into the whole run"

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``report`` subcommand and its actions."""
    report = subparsers.add_parser("report", help=HELP, description=HELP, parents=parents)
    sub = report.add_subparsers(dest="report_command", metavar="ACTION", parser_class=type(report))
    report.set_defaults(func=run, report_command=None)
    text = ("join the run folders of 'milcore train --fold K' (every fold once, same inputs and options) into one "
            "run folder: metrics with CIs, predictions, attention, report, passport; or the folders of 'milcore "
            "bench aggregators --fold K' (or --seeds S) into one benchmark folder: bench.json, table.md, "
            "report")  # fmt: skip
    p = sub.add_parser("merge", help=text, description=text, parents=parents)
    p.add_argument("runs", nargs="+", metavar="RUN", help="one-fold run folders (or benchmark parts), any order")
    p.add_argument("--out", required=True, help="the run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--allow-partial", action="store_true",
                   help="benchmark folders only: merge although folds are missing; the result is marked PARTIAL in "
                        "bench.json, table.md and the report")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; returns the exit code."""
    from feature_cache.errors import InvalidArgumentError

    if args.report_command != "merge":
        raise InvalidArgumentError("milcore report: choose an action: merge")
    from milcore.bench.merge import is_bench_folder

    benches = [is_bench_folder(r) for r in args.runs]
    if any(benches):
        if not all(benches):
            other, bench = args.runs[benches.index(False)], args.runs[benches.index(True)]
            raise InvalidArgumentError(f"{other}: not a benchmark folder (no bench.json), unlike {bench}; merge "
                                       "training runs and benchmarks separately")  # fmt: skip
        from milcore.bench.merge import merge_benches

        result = merge_benches(args.runs, args.out, overwrite=args.overwrite, allow_partial=args.allow_partial)
        if result.get("partial"):
            log.warning("warning: %s", result["partial"]["message"])
        log.info("benchmark of %d runs from %d parts: %s/table.md, %s/report.html", len(result["runs"]),
                 len(result["parts"]), args.out, args.out)  # fmt: skip
        return 1 if result["failed"] else 0
    if args.allow_partial:
        raise InvalidArgumentError("--allow-partial: only for benchmark folders; a merged training run needs "
                                   "every fold")  # fmt: skip
    from milcore.crossval.merge import merge_runs

    cv = merge_runs(args.runs, args.out, overwrite=args.overwrite)
    log.info("%s", cv.summary())
    log.info("report: %s/report.html  metrics: %s/metrics.json", args.out, args.out)
    return 0
