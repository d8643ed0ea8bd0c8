"""``milcore synth``: write a synthetic blood-smear cohort (crops, cohort.csv, cells.csv)."""

from __future__ import annotations

import argparse
import logging

HELP = "synthesize a blood-smear cohort: single-cell crops, cohort.csv and cells.csv ground truth"

log = logging.getLogger("milcore")


def _rate(text: str) -> float:
    from milcore.cli._types import fraction

    value = fraction(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0 (a diseased patient needs diagnostic cells)")
    return value


def _tasks() -> list[str]:
    """The synthetic tasks (read when the command line is checked or help is shown, not when the parser is built)."""
    from feature_cache.sources.synthetic_vocab import list_tasks

    return list_tasks()


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``synth`` subcommand."""
    from milcore.cli._types import _LazyChoices, fraction, int_at_least, non_negative

    p = subparsers.add_parser(
        "synth",
        help=HELP,
        description=HELP + ". Deterministic for a seed; see the README for the difficulty knobs.",
        parents=parents,
    )
    p.add_argument("out", metavar="OUT", help="output folder (must be absent or empty unless --overwrite)")
    p.add_argument("--task", required=True, choices=_LazyChoices(_tasks), metavar="TASK",
                   help="diagnostic task: %(choices)s")
    p.add_argument("--patients", type=int_at_least(1), default=60, help="number of patients (default 60)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    p.add_argument(
        "--bias",
        action="append",
        default=None,
        metavar="COLUMN=VALUE:FACTOR",
        help="planted subgroup effect, e.g. sex=F:0.5 (rate x0.5), age=72-86:0.3, site=1:subtle=0.5; repeatable",
    )
    p.add_argument(
        "--confound",
        action="append",
        default=None,
        metavar="COLUMN:STRENGTH",
        help="planted label confound: site:0.8 sends 80%% of class k to site k %% sites (needs --sites >= 2); "
        "date:0.8 acquires them in the k-th period of the year; repeatable (one per column)",
    )
    p.add_argument("--sites", type=int_at_least(1), default=1, help="acquisition sites (default 1)")
    p.add_argument("--site-strength", type=non_negative, default=1.0, help="how much sites differ (default 1)")
    p.add_argument("--crop-size", type=int_at_least(32), default=96, help="crop side in pixels (default 96)")
    p.add_argument("--bag-median", type=int_at_least(1), default=300, help="median cells per patient")
    p.add_argument("--bag-min", type=int_at_least(1), default=10, help="smallest bag (default 10)")
    p.add_argument("--bag-max", type=int_at_least(1), default=2000, help="largest bag (default 2000)")
    p.add_argument(
        "--witness-median", type=_rate, default=0.06, help="median fraction of diagnostic cells (default 0.06)"
    )
    p.add_argument("--subtlety", type=fraction, default=0.0, help="0 textbook .. 1 indistinguishable abnormal cells")
    p.add_argument("--workers", type=int_at_least(1), default=1, help="render processes (output is identical)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT once the new cohort is complete")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the cohort described by ``args``; returns the exit code."""
    from feature_cache.sources.synthetic import SynthConfig, parse_bias, parse_confound, write_cohort

    witness_range = (min(0.01, args.witness_median), max(0.5, args.witness_median))
    config = SynthConfig(
        task=args.task,
        patients=args.patients,
        seed=args.seed,
        crop_size=args.crop_size,
        bag_median=args.bag_median,
        bag_range=(args.bag_min, args.bag_max),
        witness_median=args.witness_median,
        witness_range=witness_range,
        subtlety=args.subtlety,
        sites=args.sites,
        site_strength=args.site_strength,
        biases=tuple(parse_bias(b) for b in (args.bias or [])),
        confounds=tuple(parse_confound(c) for c in (args.confound or [])),
    )
    summary = write_cohort(config, args.out, overwrite=args.overwrite, workers=args.workers)
    classes = ", ".join(f"{k}: {v}" for k, v in sorted(summary.classes.items()))
    log.info("cohort: %s (%d patients, %d cells; %s)", summary.out, summary.patients, summary.cells, classes)
    log.info("labels: %s  ground truth: %s", summary.out / "cohort.csv", summary.out / "cells.csv")
    return 0
