"""``milcore encoder``: train cell encoders on single cells, and probe any encoder.

Forms::

    milcore encoder train --data CELLS --out DIR [--mode supervised|ssl] [--backbone compact_cnn|efficientnet_lite0]
                          [--image-size S] [--epochs E] ... [--augment KEY=VALUE] [--no-augment] [--overwrite]
                          [--attributes COL,COL] [--attribute-weight W]   (supervised, CSV data)
    milcore encoder probe --data CELLS --encoder NAME [--weights FILE] [--encoder-arg KEY=VALUE]
                          [--protocol auto|split|cv] [--folds K] [--knn-k K] [--out DIR]

``CELLS`` is a class-per-folder crop tree, a CSV (``path,label[,split]``) or a MedMNIST ``.npz``. ``train``
writes ``DIR/encoder.safetensors`` and its card ``DIR/encoder.json``; the weights are used with
``milcore extract --encoder BACKBONE --weights DIR/encoder.safetensors`` like any other encoder.
Rerunning the same command resumes after the last finished epoch. A thin layer over
:mod:`feature_cache.encoders.train_supervised`, :mod:`~feature_cache.encoders.train_ssl` and
:mod:`~feature_cache.encoders.probe`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

HELP = "train cell encoders (supervised or self-supervised) on single cells, and probe any encoder"
log = logging.getLogger("milcore")

#: flags shared by both training modes (declared and documented by EncoderTrainConfig; mode-only flags below)
SHARED = ("backbone", "image_size", "width", "pretrained", "epochs", "batch_size", "lr", "weight_decay",
          "warmup_epochs", "val_fraction", "patience", "min_epochs", "max_upscale", "max_cells", "seed", "device",
          "amp", "threads", "overwrite")  # fmt: skip
SUPERVISED_ONLY = ("balance", "label_smoothing", "ema", "tta", "attributes", "attribute_weight")
SSL_ONLY = ("temperature", "proj_dim")
PROBE = ("protocol", "folds", "knn_k", "c", "max_iter", "n_boot", "max_cells", "batch_size", "device", "seed")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``encoder train`` and ``encoder probe``."""
    from feature_cache.encoders.probe import ProbeConfig
    from feature_cache.encoders.train_config import EncoderTrainConfig
    from feature_cache.encoders.train_ssl import SSLConfig
    from feature_cache.encoders.train_supervised import SupervisedConfig
    from feature_cache.registry import RegistryChoices
    from milcore.cli._types import add_config_options

    top = subparsers.add_parser("encoder", help=HELP, description=HELP, parents=parents)
    sub = top.add_subparsers(dest="encoder_command", metavar="ACTION", parser_class=type(top))
    top.set_defaults(func=run, encoder_command=None)

    t = sub.add_parser("train", parents=parents, help="train an encoder; writes weights + card usable by extract",
                       description="Train a cell encoder: supervised (labelled cells: cross-entropy, class "
                       "balancing, held-out validation, early stopping) or self-supervised (SimCLR on unlabelled "
                       "cells). Writes OUT/encoder.safetensors and OUT/encoder.json; rerunning resumes.")  # fmt: skip
    t.add_argument("--data", required=True, help="class-per-folder crop tree, CSV (path,label[,split]) or .npz")
    t.add_argument("--out", required=True, help="output folder (weights, card, resumable state)")
    t.add_argument("--mode", choices=("supervised", "ssl"), default="supervised",
                   help="supervised (needs labels) or ssl (SimCLR; labels ignored) (default supervised)")
    ssl = SSLConfig.defaults(("batch_size", "patience"))
    add_config_options(t, EncoderTrainConfig, SHARED, keep_unset=True,
                       helps={"batch_size": f"crops per step (--mode ssl: {ssl['batch_size']}, two views each)",
                              "patience": "epochs without a better validation score before stopping, 0: never "
                                          f"(--mode ssl: {ssl['patience']}); the best epoch is kept"})  # fmt: skip
    add_config_options(t, SupervisedConfig, SUPERVISED_ONLY, keep_unset=True)
    add_config_options(t, SSLConfig, SSL_ONLY, keep_unset=True)
    t.add_argument("--augment", action="append", default=None, metavar="KEY=VALUE",
                   help="augmentation setting, e.g. hed_sigma=0.1, rotate=false, scale=[0.8,1.2] (repeatable; keys: "
                        "dihedral, rotate, scale, translate, blur_p, blur_sigma, hed_sigma, rgb_jitter)")  # fmt: skip
    t.add_argument("--no-augment", action="store_true", help="train without any augmentation")
    t.set_defaults(func=run_train)

    encoders = RegistryChoices("feature_cache.encoders.registry:REGISTRY")
    p = sub.add_parser("probe", parents=parents, help="linear and k-NN probes of an encoder on labelled cells",
                       description="Encode labelled cells with any encoder and fit a logistic-regression probe and "
                       "a k-NN probe (official train->test split, or cross-validation): accuracy, balanced accuracy, "
                       "macro-F1 and per-class AUROC with bootstrap 95%% CIs.")  # fmt: skip
    p.add_argument("--data", required=True, help="labelled cells: class-per-folder tree, CSV or .npz")
    p.add_argument("--encoder", required=True, type=encoders, choices=encoders, metavar="NAME",
                   help="encoder: %(choices)s")  # fmt: skip
    p.add_argument("--weights", default=None, help="weights file (e.g. OUT/encoder.safetensors of encoder train)")
    p.add_argument("--encoder-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="encoder option, e.g. image_size=96 (repeatable)")
    p.add_argument("--out", default=None, help="folder for probe.json and probe.md")
    add_config_options(p, ProbeConfig, PROBE, keep_unset=True)
    p.set_defaults(func=run_probe)


def run(args: argparse.Namespace) -> int:
    """``milcore encoder`` without an action."""
    from feature_cache.errors import UserError

    raise UserError("choose an action: milcore encoder train ... | milcore encoder probe ...")


def _augment(args: argparse.Namespace, mode: str):
    from feature_cache.encoders.augment import AugmentConfig
    from feature_cache.errors import UserError

    base = AugmentConfig.ssl() if mode == "ssl" else AugmentConfig()
    if args.no_augment:
        if args.augment:
            raise UserError("--no-augment and --augment contradict each other")
        return AugmentConfig.none()
    values = {}
    for item in args.augment or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--augment {item!r}: expected KEY=VALUE (e.g. hed_sigma=0.1)")
        try:
            values[key.strip()] = json.loads(text.strip())
        except ValueError:
            values[key.strip()] = text.strip()
    return AugmentConfig.from_dict({**base.to_dict(), **values}) if values else base


def run_train(args: argparse.Namespace) -> int:
    """``milcore encoder train``."""
    from feature_cache.errors import UserError
    from milcore.cli._types import config_values

    given = config_values(args, SHARED)
    if args.mode == "supervised":
        from feature_cache.encoders.train_supervised import SupervisedConfig, train_supervised

        stray = [f"--{n.replace('_', '-')}" for n in SSL_ONLY if getattr(args, n) is not None]
        if stray:
            raise UserError(f"{', '.join(stray)} applies to --mode ssl")
        config = SupervisedConfig.from_dict({"data": args.data, "out": args.out, **given,
                                             **config_values(args, SUPERVISED_ONLY)})  # fmt: skip
        config = config.replace(augment=_augment(args, "supervised"))
        result = train_supervised(config)
    else:
        from feature_cache.encoders.train_ssl import SSLConfig, train_ssl

        stray = [f"--{n.replace('_', '-')}" for n in SUPERVISED_ONLY if getattr(args, n) is not None]
        if stray:
            raise UserError(f"{', '.join(stray)} applies to --mode supervised")
        config = SSLConfig.from_dict({"data": args.data, "out": args.out, **given, **config_values(args, SSL_ONLY)})
        config = config.replace(augment=_augment(args, "ssl"))
        result = train_ssl(config)
    metrics = result.card.get("metrics", {})
    keys = ("val_balanced_accuracy", "test_accuracy", "test_balanced_accuracy", "val_loss")
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
    log.info("encoder: %s (card %s)%s", result.weights, Path(result.weights).with_suffix(".json"),
             f"; {shown}" if shown else "")  # fmt: skip
    log.info("use it: %s", result.card.get("use", ""))
    return 0


def run_probe(args: argparse.Namespace) -> int:
    """``milcore encoder probe``."""
    import sys

    from feature_cache.encoders import check_encoder_options
    from feature_cache.encoders.card import write_text_atomic
    from feature_cache.encoders.probe import ProbeConfig, format_probe
    from feature_cache.encoders.probe import run_probe as probe
    from milcore.cli._types import config_values
    from milcore.cli.extract import encoder_args
    from milcore.report.files import write_json_atomic

    options = check_encoder_options(args.encoder, encoder_args(args.encoder_arg or []), label="--encoder-arg")
    config = ProbeConfig.from_dict({"data": args.data, "encoder": args.encoder, "weights": args.weights,
                                    "encoder_options": options, **config_values(args, PROBE)})  # fmt: skip
    result = probe(config)
    table = format_probe(result)
    sys.stdout.write(table + "\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "probe.json", result)
        write_text_atomic(out / "probe.md", table + "\n")
        log.info("wrote %s/probe.json and %s/probe.md", out, out)
    return 0
