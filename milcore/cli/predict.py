"""``milcore predict``: apply a checkpoint (or a run's fold ensemble) to a feature bank."""

from __future__ import annotations

import argparse
import logging

HELP = "apply a trained checkpoint (or a run's fold ensemble) to a feature bank"

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``predict`` subcommand."""
    from milcore.cli._types import int_at_least
    from milcore.trust.scores import DEFAULT_SCORE, MC_SAMPLES, SCORES
    p = subparsers.add_parser("predict", help=HELP, description=HELP + ". Writes predictions.csv (per-patient "
                              "probabilities), attention.h5 (per-cell attention aligned with the bank rows) and "
                              "predictions.json; with --cohort and --task also the labels and metrics.json. "
                              "Everything is checked before anything is written. External cohort: 'milcore "
                              "predict --checkpoint RUN --bank BANK --cohort COHORT --task COLUMN --out PRED', then "
                              "'milcore audit --run PRED --cohort COHORT --out DIR' and 'milcore explain --run PRED'.",
                              parents=parents)  # fmt: skip
    p.add_argument("--checkpoint", required=True, action="append",
                   help="a fold folder (with checkpoint.json), or a finished run folder to average all its folds; "
                   "repeatable")  # fmt: skip
    p.add_argument("--bank", required=True, help="feature bank to predict")
    p.add_argument("--out", required=True, help="output folder (absent or empty unless --overwrite)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--cohort", default=None, help="labelled cohort table: record the labels and score the "
                   "predictions (metrics.json)")  # fmt: skip
    p.add_argument("--task", default=None, metavar="COLUMN",
                   help="label column of --cohort; must be the checkpoint's task")  # fmt: skip
    p.add_argument("--cells", default=None, help="instance ground truth (default: cells.csv beside --cohort)")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept an interrupted training run (fewer fold checkpoints than configured, or no final "
                   "metrics); the output says 'ensemble of K of N folds'")  # fmt: skip
    p.add_argument("--allow-task-rename", action="store_true",
                   help="the --task column holds the checkpoint's task under another name (its labels must still "
                   "be the checkpoint's classes)")  # fmt: skip
    p.add_argument("--abstain-above", type=float, default=None, metavar="U",
                   help="refer patients whose uncertainty score is above U (0 <= U < 1; scores run from 0 = certain "
                   "to 1 = maximally uncertain) for manual review: a 'referred' column in predictions.csv, the "
                   "counts in predictions.json and metrics.json (with the metrics of the accepted patients). A "
                   "training run's report suggests U for a target balanced accuracy")  # fmt: skip
    p.add_argument("--abstain-score", default=DEFAULT_SCORE, choices=SCORES,
                   help=f"the uncertainty score --abstain-above thresholds (default {DEFAULT_SCORE}; disagreement "
                   "needs a fold ensemble, mc_dropout models with dropout)")  # fmt: skip
    p.add_argument("--mc-samples", type=int_at_least(0), default=MC_SAMPLES, metavar="N",
                   help=f"Monte-Carlo dropout passes per model with dropout (default {MC_SAMPLES}; 0: off)")
    p.add_argument("--coverage-target", type=float, action="append", default=[], metavar="X",
                   help="with a labelled --cohort: also report the coverage at which balanced accuracy reaches X "
                   "(0 < X <= 1; repeatable; 0.90 and 0.95 are always reported) and the --abstain-above U that "
                   "gets there")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Predict; returns the exit code."""
    from milcore.prediction import predict

    result = predict(args.checkpoint, args.bank, out=args.out, cohort=args.cohort, task=args.task,
                            cells=args.cells, allow_partial=args.allow_partial,
                            allow_task_rename=args.allow_task_rename, overwrite=args.overwrite,
                            device=args.device, abstain_above=args.abstain_above,
                            abstain_score=args.abstain_score, mc_samples=args.mc_samples,
                            coverage_targets=args.coverage_target)  # fmt: skip
    table = result.table
    counts = ", ".join(f"{c}: {int((table.predicted == i).sum())}" for i, c in enumerate(table.classes))
    log.info("predicted %d bags: %s (%s)", len(table.bag_ids), counts, result.checkpoints.describe())
    if result.referral is not None:
        log.info("%s; listed in %s/predictions.json (column 'referred' of predictions.csv)",
                 result.referral["sentence"], args.out)  # fmt: skip
    if result.checkpoints.partial:
        log.warning("PARTIAL: these predictions come from an %s", result.checkpoints.describe())
    log.info("wrote %s/predictions.csv, attention.h5, predictions.json and report.html", args.out)
    if result.metrics is not None:
        m, v = result.metrics, result.metrics["metrics"]
        inst = f", instance-AUROC {m['instance']['instance_auroc']:.3f}" if "instance" in m else ""
        log.info("on %d labelled bags: balanced accuracy %.3f, AUROC %.3f, ECE %.3f%s (%s/metrics.json)", m["n"],
                 v["balanced_accuracy"]["value"], v["auroc"]["value"], v["ece"]["value"], inst, args.out)  # fmt: skip
        from milcore.report.caveats import log_warnings

        log_warnings(log, m.get("warnings", []))
        acc = m.get("abstention", {}).get("accepted")
        if acc and acc["n"]:
            log.info("on the %d accepted (not referred) labelled patients: balanced accuracy %.3f", acc["n"],
                     acc["balanced_accuracy"])  # fmt: skip
    return 0
