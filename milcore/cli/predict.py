"""``milcore predict``: apply a checkpoint (or a run's fold ensemble) to a feature bank."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "apply a trained checkpoint (or a run's fold ensemble) to a feature bank"

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``predict`` subcommand."""
    p = subparsers.add_parser("predict", help=HELP, description=HELP + ". Writes predictions.csv (per-patient "
                              "probabilities) and attention.h5 (per-cell attention aligned with the bank rows).",
                              parents=parents)  # fmt: skip
    p.add_argument("--checkpoint", required=True, action="append",
                   help="a fold folder (with checkpoint.json), or a run folder to average all its folds; "
                   "repeatable")  # fmt: skip
    p.add_argument("--bank", required=True, help="feature bank to predict")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--cohort", default=None, help="labelled cohort table: also score the predictions (metrics.json)")
    p.add_argument("--task", default=None, metavar="COLUMN", help="label column of --cohort")
    p.add_argument("--cells", default=None, help="instance ground truth (default: cells.csv beside --cohort)")
    p.set_defaults(func=run)


def _expand(paths: list[str]) -> list[Path]:
    from feature_cache.errors import UserError

    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "checkpoint.json").exists():
            out.append(p)
        elif p.is_dir() and sorted(p.glob("fold_*/checkpoint.json")):
            out += [c.parent for c in sorted(p.glob("fold_*/checkpoint.json"))]
        else:
            raise UserError(f"{p}: not a checkpoint folder nor a run folder with fold checkpoints")
    return out


def run(args: argparse.Namespace) -> int:
    """Predict; returns the exit code."""
    from feature_cache.errors import UserError
    from milcore.predict import predict_bank

    if (args.cohort is None) != (args.task is None):
        raise UserError("--cohort and --task go together")
    checkpoints = _expand(args.checkpoint)
    table = predict_bank(checkpoints, args.bank, args.out, device=args.device)
    counts = ", ".join(f"{c}: {int((table.predicted == i).sum())}" for i, c in enumerate(table.classes))
    log.info("predicted %d bags with %d checkpoint(s) (%s)", len(table.bag_ids), len(checkpoints), counts)
    log.info("wrote %s/predictions.csv and %s/attention.h5", args.out, args.out)
    if args.cohort:
        from milcore.predict import evaluate_predictions

        m = evaluate_predictions(args.out, args.cohort, args.task, args.bank, args.cells)
        v = m["metrics"]
        inst = f", instance-AUROC {m['instance']['instance_auroc']:.3f}" if "instance" in m else ""
        log.info("on %d labelled bags: balanced accuracy %.3f, AUROC %.3f, ECE %.3f%s (%s/metrics.json)", m["n"],
                 v["balanced_accuracy"]["value"], v["auroc"]["value"], v["ece"]["value"], inst, args.out)  # fmt: skip
    return 0
