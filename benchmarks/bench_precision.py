"""Benchmark: how much the encoder's compute precision changes features and predictions.

A bank extracted on a GPU computes under bfloat16 autocast, one extracted on a CPU in float32; both
store float16. This script extracts the same cells both ways and applies the same trained model to
both banks, to decide whether a model trained on one precision's bank may be applied to another's
(``milcore predict`` warns; ``bank merge`` refuses to mix them in one bank without
``--accept-mixed-precision``; see ``docs/bank_schema.md``).

The bfloat16 run uses CPU autocast (``torch.autocast("cpu", torch.bfloat16)``), standing in for a
GPU's: the same precision, other kernels. Cells: the first ``--patients`` patients of the demo's
external cohort (``milcore synth --task aml --patients 20 --seed 1``; a patient does not depend on the
cohort size), rendered by the synthetic source, ``efficientnet_lite0`` at 96 px (the demo's encoder).
Model: the demo's 5-fold ABMIL run (``make demo`` or ``benchmarks/bench_demo.py`` writes it).

Reported: per-cell relative L2 difference and cosine similarity of the stored features (bf16 vs
fp32), the same for float16 storage alone (fp32 features rounded to float16: the floor every bank
has), and for the predictions: largest probability difference, share of patients whose predicted
class changes, balanced accuracy on each bank.

Usage:
    python benchmarks/bench_precision.py --run /tmp/demo/abmil [--patients 8] [--out benchmarks/results/precision]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from milcore.report.bench_io import machine_info, save_bench

log = logging.getLogger("bench_precision")


def _extract(config: Path, out: Path, bf16: bool) -> float:
    import torch

    import feature_cache.encoders as encoders
    from feature_cache.extract import ExtractConfig, extract

    real = encoders.create_encoder
    if bf16:
        encoders.create_encoder = lambda *a, **k: dataclasses.replace(real(*a, **k), dtype=torch.bfloat16)
    try:
        t0 = time.perf_counter()
        summary = extract(ExtractConfig(source="synthetic", input=str(config), encoder="efficientnet_lite0",
                                        encoder_options={"image_size": 96}, out=str(out), device="cpu",
                                        num_workers=1))  # fmt: skip
        return summary.cells / (time.perf_counter() - t0)
    finally:
        encoders.create_encoder = real


def _feature_gaps(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-cell relative L2 difference and cosine similarity of (n, D) matrices."""
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    cos = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"relative_l2_median": float(np.median(rel)), "relative_l2_max": float(rel.max()),
            "cosine_min": float(cos.min()), "cosine_median": float(np.median(cos))}  # fmt: skip


def run(run_dir: Path, patients: int, work: Path) -> dict:
    """Both extractions, the feature comparison, and the model applied to both banks."""
    import torch

    from feature_cache.bank import open_reader
    from feature_cache.sources.synthetic import SynthConfig, SyntheticCohort
    from milcore.prediction import predict

    torch.set_num_threads(2)
    config = work / "external.json"
    config.write_text(json.dumps({"task": "aml", "patients": patients, "seed": 1}))
    cohort = work / "cohort.csv"
    with open(cohort, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "aml"])
        w.writerows([p.patient_id, p.label] for p in SyntheticCohort(SynthConfig(task="aml", patients=patients,
                                                                                 seed=1)).patients)  # fmt: skip
    speed = {"float32": _extract(config, work / "fp32.h5", bf16=False),
             "bfloat16": _extract(config, work / "bf16.h5", bf16=True)}  # fmt: skip
    with open_reader(work / "fp32.h5") as a, open_reader(work / "bf16.h5") as b:
        assert a.info.compute_dtype == "float32" and b.info.compute_dtype == "bfloat16"
        ids = a.bag_ids()
        fa = np.concatenate([a.read(i).astype(np.float32) for i in ids])  # (N, D) stored float16
        fb = np.concatenate([b.read(i).astype(np.float32) for i in ids])
    # the float16 storage floor: the same fp32 computation, stored as float32 vs float16
    from feature_cache.encoders import create_encoder
    from feature_cache.sources import create_source

    source = create_source("synthetic", config)
    encoder = create_encoder("efficientnet_lite0", device="cpu", image_size=96)
    first = source.read_bag(ids[0])
    exact = encoder.encode(first.pixels)  # (n, D) float32
    storage = _feature_gaps(exact, exact.astype(np.float16).astype(np.float32))
    preds = {}
    for name in ("fp32", "bf16"):
        result = predict(run_dir, work / f"{name}.h5", cohort=cohort, task="aml", n_boot=200, device="cpu")
        preds[name] = result
    pa, pb = preds["fp32"].table, preds["bf16"].table
    assert pa.bag_ids == pb.bag_ids
    return {
        "benchmark": "precision",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "setup": {"run": str(run_dir), "patients": patients, "cells": len(fa), "encoder": "efficientnet_lite0@96",
                  "bf16": "CPU autocast", "threads": torch.get_num_threads()},
        "extraction_cells_per_s": speed,
        "features_bf16_vs_fp32": _feature_gaps(fa, fb),
        "features_float16_storage_only": storage,
        "predictions": {
            "max_abs_probability_difference": float(np.abs(pa.proba - pb.proba).max()),
            "patients_with_another_predicted_class": int((pa.predicted != pb.predicted).sum()),
            "patients": len(pa.bag_ids),
            "balanced_accuracy_fp32": preds["fp32"].metrics["metrics"]["balanced_accuracy"]["value"],
            "balanced_accuracy_bf16": preds["bf16"].metrics["metrics"]["balanced_accuracy"]["value"],
        },
    }  # fmt: skip


def format_table(result: dict) -> str:
    """Markdown table."""
    f, s, p = result["features_bf16_vs_fp32"], result["features_float16_storage_only"], result["predictions"]
    sp = result["extraction_cells_per_s"]
    return "\n".join([
        f"{result['setup']['patients']} patients, {result['setup']['cells']:,} cells, efficientnet_lite0 at 96 px",
        "",
        "| comparison | rel. L2 diff. (median) | (max) | cosine (median) | (min) |",
        "|---|---:|---:|---:|---:|",
        f"| bf16 autocast vs fp32 (both stored float16) | {f['relative_l2_median']:.2e} | {f['relative_l2_max']:.2e} | "
        f"{f['cosine_median']:.6f} | {f['cosine_min']:.6f} |",
        f"| float16 storage alone (first bag) | {s['relative_l2_median']:.2e} | {s['relative_l2_max']:.2e} | "
        f"{s['cosine_median']:.6f} | {s['cosine_min']:.6f} |",
        "",
        f"Predictions of the same model on both banks: largest probability difference "
        f"{p['max_abs_probability_difference']:.4f}; {p['patients_with_another_predicted_class']} of {p['patients']} "
        f"patients change class; balanced accuracy {p['balanced_accuracy_fp32']:.3f} (fp32) vs "
        f"{p['balanced_accuracy_bf16']:.3f} (bf16). Extraction {sp['float32']:.0f} vs {sp['bfloat16']:.0f} cells/s "
        f"on CPU; load average {result['machine']['load_average']}.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the demo's ABMIL run folder")
    parser.add_argument("--patients", type=int, default=8, help="first patients of the external cohort")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.run, args.patients, Path(tmp))
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
