"""``milcore extract``: pre-extract cell features from crops, fields, slides or a synthetic cohort into a bank."""

from __future__ import annotations

import argparse
import logging

HELP = "pre-extract cell features (crops, smear fields, slides or the synthetic cohort) into a feature bank"

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``extract`` subcommand."""
    from feature_cache.registry import RegistryChoices
    from milcore.cli._types import int_at_least

    # registered names, read when the option is parsed or its help printed (not when the parser is built)
    sources = RegistryChoices("feature_cache.sources.registry:REGISTRY")
    encoders = RegistryChoices("feature_cache.encoders.registry:REGISTRY")

    p = subparsers.add_parser(
        "extract", help=HELP, parents=parents,
        description=HELP + ". One bag per patient folder, field image or slide; rerunning resumes, after checking "
        "that every bag already in the bank was extracted from the same files (names, sizes, modification times) "
        "and source settings: a bag recorded from another input is refused, by name.",
    )  # fmt: skip
    p.add_argument("--source", required=True, type=sources, choices=sources, metavar="KIND",
                   help="kind of input: %(choices)s")  # fmt: skip
    p.add_argument("--input", required=True, help="crop root, field-image folder, slide folder or synthetic cohort")
    p.add_argument("--encoder", required=True, type=encoders, choices=encoders, metavar="NAME",
                   help="encoder: %(choices)s")  # fmt: skip
    p.add_argument("--out", required=True, help="bank to write or extend (.h5 or .zarr)")
    p.add_argument("--cells", choices=("wbc", "rbc"), default=None, help="cells to detect in fields/slides")
    p.add_argument("--weights", default=None, help="local weights file for the encoder")
    p.add_argument("--encoder-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="encoder option, e.g. image_size=96 (repeatable; checked against the encoder's declared "
                        "options before anything is written)")  # fmt: skip
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="crops per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int_at_least(0), default=None, help="bag-reading worker processes")
    p.add_argument("--shard", default=None, metavar="I/N", help="take every N-th bag starting at I (own output file)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature dtype")
    p.add_argument("--compression", choices=("none", "lzf", "gzip", "blosc-zstd"), default=None)
    p.add_argument("--max-crop-pixels", type=int_at_least(1), default=None, metavar="N",
                   help="crops source: largest crop accepted, width x height (default 1048576 = 1024 x 1024); a "
                        "larger image stops the run, naming the file")  # fmt: skip
    p.add_argument("--stain-norm", choices=("reinhard", "macenko"), default=None,
                   help="normalise each bag's stain (fitted on all its crops) before encoding; recorded in the "
                        "bank's encoder fingerprint")  # fmt: skip
    p.add_argument("--stain-reference", default=None, metavar="PATH",
                   help="crops (folder, CSV or .npz) whose colour statistics are the stain target (default: the "
                        "built-in BloodMNIST target)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing bank instead of resuming it")
    p.add_argument("--accept-unrecorded", action="store_true",
                   help="resume a bank written before sources were recorded, trusting that its bags come from "
                        "--input (they cannot be checked)")  # fmt: skip
    p.set_defaults(func=run)


def encoder_args(items: list[str]) -> dict[str, str]:
    """``["image_size=96"]`` -> ``{"image_size": "96"}``: text, typed later by the encoder's declared options.

    Raises:
        UserError: an item without ``=``, or an option given twice.
    """
    from feature_cache.errors import UserError

    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--encoder-arg {item!r}: expected KEY=VALUE (e.g. image_size=96)")
        if key in out:
            raise UserError(f"--encoder-arg {key}: given twice ({key}={out[key]} and {item})")
        out[key] = value.strip()
    return out


def run(args: argparse.Namespace) -> int:
    """Extract; returns the exit code."""
    from feature_cache.encoders import check_encoder_options
    from feature_cache.errors import UserError
    from feature_cache.extract import ExtractConfig, extract, parse_shard

    options = check_encoder_options(args.encoder, encoder_args(args.encoder_arg or []), label="--encoder-arg")
    source_options = {}
    if args.max_crop_pixels is not None:
        if args.source != "crops":
            raise UserError(f"--max-crop-pixels applies to the crops source, not {args.source!r}")
        source_options["max_crop_pixels"] = args.max_crop_pixels
    config = ExtractConfig(
        source=args.source, input=args.input, encoder=args.encoder, out=args.out, weights=args.weights,
        cells=args.cells, batch_size=args.batch_size or 0, device=args.device,
        num_workers=-1 if args.workers is None else args.workers,
        shard=parse_shard(args.shard) if args.shard else None, dtype=args.dtype, compression=args.compression,
        encoder_options=options, source_options=source_options, overwrite=args.overwrite,
        accept_unrecorded=args.accept_unrecorded, stain_norm=args.stain_norm, stain_reference=args.stain_reference,
    )  # fmt: skip
    from feature_cache.distributed import detect_rank, extract_distributed

    rank = detect_rank()
    if config.shard is None and rank.distributed:  # launched by torchrun: balanced shards, rank 0 merges
        summary = extract_distributed(config, rank)
        if summary is None:
            return 0
    else:
        summary = extract(config)
    log.info("bank: %s (%d bags written, %d already there, %d cells, %.0f cells/s)", summary.bank,
             summary.bags_written, summary.bags_skipped, summary.cells, summary.cells_per_second)  # fmt: skip
    return 0
