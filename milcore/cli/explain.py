"""``milcore explain``: per-patient galleries of the cells that drove each decision."""

from __future__ import annotations

import argparse
import logging

HELP = "per-patient galleries of the cells that drove each decision"

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``explain`` subcommand."""
    from milcore.cli._types import int_at_least

    p = subparsers.add_parser("explain", help=HELP, description=HELP + ".", parents=parents)
    p.add_argument("--run", required=True, help="training run (or 'milcore predict' output) folder")
    p.add_argument("--crops", default=None,
                   help="root of <bag_id>/<cell_id>.png crops (default: the cohort's folder when it holds the bag "
                   "folders); an error when no crop of a gallery is found there")  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default RUN/explain)")
    p.add_argument("--top", type=int_at_least(1), default=8, help="cells per gallery row (default 8)")
    p.add_argument("--patients", type=int_at_least(1), default=12, help="patients shown (default 12)")
    p.add_argument("--similar", type=int_at_least(0), default=0, metavar="K",
                   help="per patient shown, the K most similar training patients of the run with their diagnoses "
                   "and most characteristic cells (the run's similar-case index, RUN/similar_index.h5, is built on "
                   "first use); refused for a bank from another encoder")  # fmt: skip
    p.add_argument("--similar-crops", default=None, metavar="ROOT",
                   help="crop root of the training patients (default: the run's cohort folder when it holds them)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the explanations; returns the exit code."""
    from pathlib import Path

    from milcore.explain import explain_run

    out = Path(args.out) if args.out else Path(args.run) / "explain"
    summary = explain_run(args.run, args.crops, out, top_k=args.top, max_patients=args.patients,
                          similar=args.similar, similar_crops=args.similar_crops)  # fmt: skip
    log.info("explained %d patients: %s/explain.html (JSON: explain.json)", len(summary["patients"]), out)
    if summary.get("missing_crops"):
        log.warning("%d gallery tiles have no crop under %s (crossed grey tiles; listed in explain.json)",
                    summary["missing_crops"], summary["crops"])  # fmt: skip
    if summary.get("abstention"):
        log.info("%s", summary["abstention"]["sentence"])
    if summary.get("similar"):
        log.info("similar training cases for %d patients (explain.json: 'similar')", len(summary["similar"]))
    if summary.get("partial"):
        log.warning("PARTIAL: these predictions come from an %s", summary["ensemble"])
    return 0
