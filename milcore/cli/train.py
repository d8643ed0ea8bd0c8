"""``milcore train``: patient-level cross-validation of a MIL bag classifier from a bank and a cohort table."""

from __future__ import annotations

import argparse
import logging

HELP = "train a MIL bag classifier with patient-level cross-validation"

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``train`` subcommand."""
    from milcore.cli._types import FOLDS_HELP, int_at_least, positive_float

    p = subparsers.add_parser("train", help=HELP, description=HELP + ".", parents=parents)
    p.add_argument("--bank", required=True, help="feature bank (.h5 or .zarr)")
    p.add_argument("--cohort", required=True,
                   help="cohort table (CSV/Parquet) with a bag-id and a label column; rows whose label is empty, NA, "
                        "N/A, NaN, null, None, -, ? (any case) are left out as missing")  # fmt: skip
    p.add_argument("--task", required=True, metavar="COLUMN", help="label column of the cohort table")
    p.add_argument("--model", default=None, help="aggregator name (default abmil; 'milcore models' lists them)")
    p.add_argument("--folds", type=int_at_least(3), default=5, help=FOLDS_HELP)
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of splits, weights and batching")
    p.add_argument("--out", required=True, help="run folder")
    # training options default to None so that a --config file's values are kept unless a flag is given
    p.add_argument("--epochs", type=int_at_least(1), default=None, help="maximum epochs per fold (default 40)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--patience", type=int_at_least(1), default=None, help="early-stopping patience (default 10)")
    p.add_argument("--batch-instances", type=int_at_least(1), default=None,
                   help="cells per optimisation step (default 2048)")
    p.add_argument("--instance-dropout", type=float, default=None, metavar="FRACTION",
                   help="fraction of each training bag's cells left out at every step (default 0)")
    p.add_argument("--input-norm", choices=("none", "standardize"), default=None,
                   help="standardise features with the training fold's statistics (default none)")
    p.add_argument("--bel", type=float, default=None, metavar="WEIGHT", help="Bag Embedding Loss weight (0 = off)")
    p.add_argument("--sampler", choices=("shuffle", "balanced"), default=None, help="default shuffle")
    p.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="aggregator config override, e.g. embed_dim=256 (repeatable; 'milcore models NAME' "
                        "lists the keys)")  # fmt: skip
    p.add_argument("--cells", default=None, help="instance ground truth (default: cells.csv beside the cohort)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML file with a 'train:' mapping of training options, or a run's config.yaml "
                        "(command-line flags win)")  # fmt: skip
    p.add_argument("--tensorboard", action="store_true", help="also log epochs for TensorBoard (fold_K/tensorboard)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (refused unless bank, labels, task, folds, seed and "
                        "training options are the ones it was started with)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and report; returns the exit code."""
    from milcore.cli._types import parse_overrides, read_yaml
    from milcore.training.config import TrainConfig, options_from_file
    from milcore.training.run import RunSpec, train_cv

    options = options_from_file(read_yaml(args.config), args.config) if args.config else {}
    flags = {"model": args.model, "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
             "patience": args.patience, "batch_instances": args.batch_instances,
             "instance_dropout": args.instance_dropout, "input_norm": args.input_norm, "bel_weight": args.bel,
             "sampler": args.sampler, "device": args.device, "seed": args.seed}  # fmt: skip
    options.update({k: v for k, v in flags.items() if v is not None})
    if args.tensorboard:
        options["tensorboard"] = True
    if args.model_arg:
        options["model_args"] = {**options.get("model_args", {}), **parse_overrides(args.model_arg)}
    config = TrainConfig.from_dict(options)
    from milcore.models import get_aggregator_entry

    get_aggregator_entry(config.model)  # unknown names fail before any work, with close matches
    spec = RunSpec(bank=args.bank, cohort=args.cohort, task=args.task, folds=args.folds, seed=args.seed,
                   cells=args.cells)  # fmt: skip
    metrics = train_cv(spec, config, args.out, overwrite=args.overwrite, resume=args.resume)
    mean = metrics["mean"]
    log.info("%s on %s: balanced accuracy %.3f ± %.3f, macro-F1 %.3f, AUROC %.3f, ECE %.3f", config.model, args.task,
             mean["balanced_accuracy"]["mean"], mean["balanced_accuracy"]["sd"], mean["macro_f1"]["mean"],
             mean["auroc"]["mean"], mean["ece"]["mean"])  # fmt: skip
    if "instance" in metrics:
        log.info("attention instance-AUROC %.3f", metrics["instance"]["instance_auroc"])
    log.info("report: %s/report.html  metrics: %s/metrics.json", args.out, args.out)
    return 0
