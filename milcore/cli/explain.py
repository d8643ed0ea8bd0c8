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
    p.add_argument("--attributes", default=None, metavar="CELLS_CSV|HEADS.json",
                   help="morphological attributes of each patient's top cells: a cell table with WBCAtt-style "
                   "attribute columns (a synthetic cohort's cells.csv; heads trained on the run's bank, held-out "
                   "macro-F1 reported, RUN/concepts.json written for the passport) or saved heads (.json)")  # fmt: skip
    p.add_argument("--pixels", nargs="?", const="", default=None, metavar="METHODS",
                   help="pixel explanations of the top cells (integrated_gradients, occlusion, gradcam; default "
                   "integrated_gradients) through "
                   "encoder and aggregator, as overlays, scored by the pointing game where the synthetic masks exist; "
                   "needs the crops and the bank's encoder (skipped with a note otherwise)")  # fmt: skip
    p.add_argument("--pixel-cells", type=int_at_least(1), default=3, metavar="K",
                   help="top cells explained per patient with --pixels (default 3)")
    p.add_argument("--pixel-score", default=None, metavar="SCORE",
                   help="what --pixels explains: attention (the cell's own attention, default), bag (the predicted "
                   "class's bag logit) or contribution (attention x the cell's own logit)")  # fmt: skip
    p.add_argument("--encoder-weights", default=None, metavar="FILE",
                   help="with --pixels: the weights file the bank was extracted with, for an encoder trained with "
                   "'milcore encoder train' (checked against the bank's encoder fingerprint)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="device of the pixel explanations (cpu, cuda, auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the explanations; returns the exit code."""
    from pathlib import Path

    from milcore.explain import explain_run

    out = Path(args.out) if args.out else Path(args.run) / "explain"
    pixels = None
    if args.encoder_weights is not None and args.pixels is None:
        from feature_cache.errors import InvalidArgumentError

        raise InvalidArgumentError("--encoder-weights is only used by --pixels")
    if args.pixels is not None:
        from feature_cache.devices import resolve_device
        from feature_cache.errors import InvalidArgumentError
        from milcore.trust.pixels import SCORES, PixelConfig

        if args.pixel_score is not None and args.pixel_score not in SCORES:
            raise InvalidArgumentError(f"--pixel-score {args.pixel_score!r}: not one of {', '.join(SCORES)}")
        methods = tuple(m.strip() for m in args.pixels.split(",") if m.strip())
        chosen = {"methods": methods, "score": args.pixel_score, "encoder_weights": args.encoder_weights}
        pixels = PixelConfig.from_dict({**{k: v for k, v in chosen.items() if v}, "cells_per_patient": args.pixel_cells,
                                        "device": str(resolve_device(args.device))})  # fmt: skip
    summary = explain_run(args.run, args.crops, out, top_k=args.top, max_patients=args.patients,
                          similar=args.similar, similar_crops=args.similar_crops, attributes=args.attributes,
                          pixels=pixels)  # fmt: skip
    log.info("explained %d patients: %s/explain.html (JSON: explain.json)", len(summary["patients"]), out)
    if summary.get("missing_crops"):
        log.warning("%d gallery tiles have no crop under %s (crossed grey tiles; listed in explain.json)",
                    summary["missing_crops"], summary["crops"])  # fmt: skip
    if summary.get("abstention"):
        log.info("%s", summary["abstention"]["sentence"])
    if summary.get("similar"):
        log.info("similar training cases for %d patients (explain.json: 'similar')", len(summary["similar"]))
    if summary.get("concepts"):
        f1 = summary["concepts"]["macro_f1"]
        log.info("attributes of the top cells for %d patients (heads' held-out macro-F1 %s)",
                 sum("attributes" in p for p in summary["patients"].values()), "n/a" if f1 is None else f"{f1:.3f}")
        from milcore.data.predictions import prediction_sources

        if prediction_sources(Path(args.run))["kind"] == "run" and (Path(args.run) / "metrics.json").is_file():
            from milcore.crossval.report import refresh_run_report

            html, _ = refresh_run_report(args.run)  # the training report shows the top cells' attributes too
            log.info("training report updated with the attributes of the top cells: %s", html)
    if summary.get("pixels"):
        for note in summary["pixels"]["notes"]:
            log.warning("pixels: %s", note)
        for m, s in summary["pixels"]["pointing_game"].items():
            log.info("pointing game (%s): %d/%d cells (%.2f)", m, s["hits"], s["cells"], s["accuracy"])
    if summary.get("partial"):
        log.warning("PARTIAL: these predictions come from an %s", summary["ensemble"])
    return 0
