"""``milcore extract``: pre-extract cell features from crops, fields, slides or a synthetic cohort into a bank."""

from __future__ import annotations

import argparse
import logging

HELP = "pre-extract cell features (crops, smear fields, slides or the synthetic cohort) into a feature bank"
SOURCES = ("crops", "fields", "slides", "synthetic")

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``extract`` subcommand."""
    from milcore.cli._types import int_at_least

    p = subparsers.add_parser(
        "extract", help=HELP, parents=parents,
        description=HELP + ". One bag per patient folder, field image or slide; rerunning resumes.",
    )  # fmt: skip
    p.add_argument("--source", required=True, choices=SOURCES, help="kind of input")
    p.add_argument("--input", required=True, help="crop root, field-image folder, slide folder or synthetic cohort")
    p.add_argument("--encoder", required=True, help="encoder name (e.g. efficientnet_lite0, morphology, toy)")
    p.add_argument("--out", required=True, help="bank to write or extend (.h5 or .zarr)")
    p.add_argument("--cells", choices=("wbc", "rbc"), default=None, help="cells to detect in fields/slides")
    p.add_argument("--weights", default=None, help="local weights file for the encoder")
    p.add_argument("--encoder-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="encoder option, e.g. image_size=96 (repeatable)")  # fmt: skip
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="crops per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int_at_least(0), default=None, help="bag-reading worker processes")
    p.add_argument("--shard", default=None, metavar="I/N", help="take every N-th bag starting at I (own output file)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature dtype")
    p.add_argument("--compression", choices=("none", "lzf", "gzip", "blosc-zstd"), default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing bank instead of resuming it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Extract; returns the exit code."""
    from feature_cache.extract import ExtractConfig, extract, parse_shard
    from milcore.cli._types import parse_overrides

    config = ExtractConfig(
        source=args.source, input=args.input, encoder=args.encoder, out=args.out, weights=args.weights,
        cells=args.cells, batch_size=args.batch_size or 0, device=args.device,
        num_workers=-1 if args.workers is None else args.workers,
        shard=parse_shard(args.shard) if args.shard else None, dtype=args.dtype, compression=args.compression,
        encoder_options=parse_overrides(args.encoder_arg or []), overwrite=args.overwrite,
    )  # fmt: skip
    summary = extract(config)
    log.info("bank: %s (%d bags written, %d already there, %d cells, %.0f cells/s)", summary.bank,
             summary.bags_written, summary.bags_skipped, summary.cells, summary.cells_per_second)  # fmt: skip
    return 0
