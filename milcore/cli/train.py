"""``milcore train``: patient-level cross-validation of a MIL bag classifier from a bank and a cohort table."""

from __future__ import annotations

import argparse
import logging

HELP = "train a MIL bag classifier with patient-level cross-validation"

log = logging.getLogger("milcore")


#: Flags named before the config convention (``milcore run`` experiments use them).
TRAIN_FLAGS = {"bel_weight": ("--bel", "--bel-weight")}


def train_options() -> tuple[str, ...]:
    """The ``TrainConfig`` fields given as ``milcore train`` flags: all but ``model_args`` (``--model-arg``)."""
    from milcore.training.config import TrainConfig

    return tuple(n for n in TrainConfig.field_names() if n != "model_args")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``train`` subcommand."""
    from milcore.cli._types import FOLDS_HELP, add_config_options
    from milcore.training.config import RunSpec, TrainConfig

    p = subparsers.add_parser("train", help=HELP, description=HELP + ".", parents=parents)
    p.add_argument("--bank", required=True, help="feature bank (.h5 or .zarr)")
    p.add_argument("--cohort", required=True,
                   help="cohort table (CSV/Parquet) with a bag-id and a label column; rows whose label is empty, NA, "
                        "N/A, NaN, null, None, -, ? (any case) are left out as missing")  # fmt: skip
    p.add_argument("--task", required=True, metavar="COLUMN", help="label column of the cohort table")
    add_config_options(p, RunSpec, ("folds", "cells"),
                       helps={"folds": FOLDS_HELP, "cells": "instance ground truth (default: cells.csv beside the "
                              "cohort)"})  # fmt: skip
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="YAML file with a 'train:' mapping of training options, or a run's config.yaml "
                        "(command-line flags win)")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (refused unless bank, labels, task, folds, seed and "
                        "training options are the ones it was started with)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--fold", type=int, default=None, metavar="K",
                   help="train only fold K (0 .. --folds - 1) into --out, e.g. one task of a job array; join the "
                        "folds with 'milcore report merge'")  # fmt: skip
    group = p.add_argument_group("training options (TrainConfig; unset flags keep a --config file's values)")
    # unset flags are None so that a --config file's values are kept unless a flag is given
    add_config_options(group, TrainConfig, train_options(), flags=TRAIN_FLAGS, keep_unset=True,
                       metavars={"instance_dropout": "FRACTION", "bel_weight": "WEIGHT"},
                       helps={"model": "aggregator name ('milcore models' lists them)",
                              "seed": "seed of splits, weights and batching",
                              "tensorboard": "also log epochs for TensorBoard (fold_K/tensorboard)"})  # fmt: skip
    group.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE",
                       help="aggregator config override, e.g. embed_dim=256 (repeatable; 'milcore models NAME' "
                            "lists the keys)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and report; returns the exit code."""
    from milcore.cli._types import config_values, parse_overrides, read_yaml
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig, options_from_file

    options = options_from_file(read_yaml(args.config), args.config) if args.config else {}
    options.update(config_values(args, train_options()))
    if args.model_arg:
        options["model_args"] = {**options.get("model_args", {}), **parse_overrides(args.model_arg)}
    config = TrainConfig.from_dict(options)
    from milcore.models import get_aggregator_entry

    get_aggregator_entry(config.model)  # unknown names fail before any work, with close matches
    spec = RunSpec(bank=args.bank, cohort=args.cohort, task=args.task, folds=args.folds, seed=config.seed,
                   cells=args.cells)  # split seed = training seed (--seed, else the --config file's)  # fmt: skip
    from feature_cache.distributed import detect_rank

    if detect_rank().distributed and args.fold is None:
        from feature_cache.errors import InvalidArgumentError

        raise InvalidArgumentError("under torchrun, milcore train trains one fold with DDP: add --fold K (and join "
                                   "the folds with milcore report merge)")  # fmt: skip
    if args.fold is not None:
        from milcore.crossval.run import train_fold_run

        result = train_fold_run(spec, config, args.out, args.fold, overwrite=args.overwrite, resume=args.resume)
        row = result.metrics
        log.info("fold %d: balanced accuracy %.3f, AUROC %.3f; join the folds with: milcore report merge RUN_0 ... "
                 "RUN_%d --out RUN", args.fold, row["balanced_accuracy"], row["auroc"], args.folds - 1)  # fmt: skip
        return 0
    cv = train_run(spec, config, args.out, overwrite=args.overwrite, resume=args.resume)
    metrics = cv.metrics
    log.info("%s", cv.summary())
    if "instance" in metrics:
        log.info("attention instance-AUROC %.3f", metrics["instance"]["instance_auroc"])
    log.info("report: %s/report.html  metrics: %s/metrics.json", args.out, args.out)
    return 0
