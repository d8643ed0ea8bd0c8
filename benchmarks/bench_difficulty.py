"""Benchmark: how hard the synthetic cohort is, on simple colour-histogram cell features.

Renders a synthetic cohort in memory (default: AML, 100 patients, bags of about 200 cells, the
generator's other defaults), describes every cell by a joint RGB colour histogram (4 x 4 x 4 bins,
fractions of the crop's pixels: no learned encoder), and compares on the same 5 patient-level folds:

- **mean pooling + logistic regression**: each patient's mean histogram, standardised, multinomial
  logistic regression (scikit-learn, class-balanced weights): what a bag-average can see;
- **gated attention MIL** (``abmil``) trained by ``milcore`` at the ``TrainConfig`` defaults (with
  ``--input-norm standardize``: features standardised on each training fold, as the logistic
  regression's are), with its attention scored against ``cells.csv`` (instance-AUROC: are the
  diagnostic cells ranked first).

A wide gap says the cohort needs multiple-instance learning (the witnesses are rare) and that the
witness cells are findable from colour alone. The README's difficulty figures come from here.

Usage:
    python benchmarks/bench_difficulty.py [--task aml] [--patients 100] [--bag-median 200] [--seed 0]
        [--folds 5] [--out benchmarks/results/difficulty] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from milcore.report.bench_io import machine_info, save_bench

log = logging.getLogger("bench_difficulty")
BINS = 4  # per channel: 4 x 4 x 4 = 64 colour bins


def colour_histograms(crops: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) uint8 -> (n, 64) float32: fraction of each crop's pixels in each joint RGB bin."""
    q = (crops.astype(np.int64) * BINS) // 256  # (n, S, S, 3) in 0..BINS-1
    code = (q[..., 0] * BINS + q[..., 1]) * BINS + q[..., 2]  # (n, S, S)
    n = len(crops)
    flat = code.reshape(n, -1) + (np.arange(n) * BINS**3)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n * BINS**3).reshape(n, BINS**3)
    return (counts / code[0].size).astype(np.float32)


def write_inputs(folder: Path, task: str, patients: int, bag_median: int, seed: int) -> dict:
    """Render the cohort, write ``bank.h5`` (colour histograms), ``cohort.csv`` and ``cells.csv``."""
    from feature_cache.bank import EncoderInfo, open_writer
    from feature_cache.sources.synthetic import SynthConfig, SyntheticCohort

    cohort = SyntheticCohort(SynthConfig(task=task, patients=patients, seed=seed, bag_median=bag_median))
    info = EncoderInfo(name="colour_histogram", version="1", weights_sha256="", transform=f"rgb_bins={BINS}",
                       dim=BINS**3, compute_dtype="float32")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells_total = 0
    with open_writer(folder / "bank.h5", info, mode="w", dtype="float32") as writer, \
            open(folder / "cells.csv", "w", newline="") as cells_file:  # fmt: skip
        cells_csv = csv.writer(cells_file)
        cells_csv.writerow(["patient_id", "cell_id", "is_diagnostic"])
        for p in cohort.patients:
            cells = cohort.cells(p)
            x = colour_histograms(cohort.render_bag(p))  # (n, 64)
            ids = cells.cell_ids()
            writer.append(p.patient_id, x, coords=cells.coords, cell_id=ids)
            cells_csv.writerows([p.patient_id, c, int(d)] for c, d in zip(ids, cells.is_diagnostic, strict=True))
            cells_total += len(ids)
    with open(folder / "cohort.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", task])
        w.writerows([p.patient_id, p.label] for p in cohort.patients)
    return {"cells": cells_total, "render_and_features_seconds": time.perf_counter() - t0,
            "labels": {p.patient_id: p.label for p in cohort.patients}}  # fmt: skip


def mean_pooling_lr(bank_path: Path, labels: dict[str, str], folds) -> list[float]:
    """Balanced accuracy per test fold of logistic regression on per-patient mean histograms."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from feature_cache.bank import open_reader

    with open_reader(bank_path) as bank:
        ids = bank.bag_ids()
        x = np.stack([bank.read(b).astype(np.float64).mean(axis=0) for b in ids])  # (B, 64)
    y = np.asarray([labels[b] for b in ids])
    where = {b: i for i, b in enumerate(ids)}
    scores = []
    for fold in folds:
        train = [where[b] for b in (*fold.train, *fold.val)]  # no model selection: validation bags train too
        test = [where[b] for b in fold.test]
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
        model.fit(x[train], y[train])
        scores.append(float(balanced_accuracy_score(y[test], model.predict(x[test]))))
    return scores


def run(task: str, patients: int, bag_median: int, seed: int, folds: int, work: Path, epochs: int | None,
        input_norm: str = "none") -> dict:
    """Inputs, then both methods on the same folds."""
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    inputs = write_inputs(work, task, patients, bag_median, seed)
    spec = RunSpec(str(work / "bank.h5"), str(work / "cohort.csv"), task, folds=folds, seed=seed, n_boot=200)
    config = TrainConfig(model="abmil", seed=seed, device="cpu", input_norm=input_norm,
                         **({"epochs": epochs} if epochs else {}))
    t0 = time.perf_counter()
    cv = train_run(spec, config, work / "abmil", overwrite=True)
    mil_seconds = time.perf_counter() - t0
    metrics = cv.metrics
    lr = mean_pooling_lr(work / "bank.h5", inputs["labels"], [f.fold for f in cv.folds])
    ba = metrics["mean"]["balanced_accuracy"]
    return {
        "benchmark": "difficulty",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "setup": {"task": task, "patients": patients, "bag_median": bag_median, "seed": seed, "folds": folds,
                  "features": f"joint RGB histogram, {BINS}x{BINS}x{BINS} bins (fractions of pixels)",
                  "cells": inputs["cells"], "sampling_version": _sampling_version()},
        "mean_pooling_lr": {"balanced_accuracy_per_fold": lr, "balanced_accuracy": float(np.mean(lr)),
                            "sd": float(np.std(lr, ddof=1)) if len(lr) > 1 else 0.0},
        "abmil": {"balanced_accuracy_per_fold": ba["values"], "balanced_accuracy": ba["mean"], "sd": ba["sd"],
                  "auroc": metrics["mean"]["auroc"]["mean"],
                  "instance_auroc": metrics["mean"].get("instance_auroc", {}).get("mean"),
                  "train_options": config.to_dict(), "seconds": mil_seconds},
        "render_and_features_seconds": inputs["render_and_features_seconds"],
    }  # fmt: skip


def _sampling_version() -> int:
    from feature_cache.sources.synthetic_cohort import SAMPLING_VERSION

    return SAMPLING_VERSION


def format_table(result: dict) -> str:
    """Markdown table."""
    s, lr, mil = result["setup"], result["mean_pooling_lr"], result["abmil"]
    inst = f"{mil['instance_auroc']:.3f}" if mil["instance_auroc"] is not None else "–"
    load = result["machine"]["load_average"]
    return "\n".join([
        f"{s['task']}, {s['patients']} patients, bag median {s['bag_median']} ({s['cells']:,} cells), "
        f"{s['folds']}-fold CV, {s['features']}",
        "",
        "| method | balanced accuracy (mean ± sd over folds) | AUROC | attention instance-AUROC |",
        "|---|---:|---:|---:|",
        f"| mean pooling + logistic regression | {lr['balanced_accuracy']:.3f} ± {lr['sd']:.3f} | – | – |",
        f"| gated attention MIL (abmil, defaults, input_norm {mil['train_options']['input_norm']}) | "
        f"{mil['balanced_accuracy']:.3f} ± {mil['sd']:.3f} | "
        f"{mil['auroc']:.3f} | {inst} |",
        "",
        f"Rendering + histograms {result['render_and_features_seconds']:.0f} s, ABMIL CV {mil['seconds']:.0f} s; "
        f"load average {load}.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="aml")
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--bag-median", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="ABMIL epochs (default: TrainConfig's)")
    parser.add_argument("--input-norm", choices=("none", "standardize"), default="none",
                        help="ABMIL feature standardisation (TrainConfig.input_norm)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/difficulty"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.patients, args.bag_median, args.folds, args.epochs = 15, 20, 3, 2
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.task, args.patients, args.bag_median, args.seed, args.folds, Path(tmp), args.epochs,
                     args.input_norm)
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
