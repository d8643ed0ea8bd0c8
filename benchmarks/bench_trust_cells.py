"""Cell-level trust targets on a synthetic AML cohort (issue 16): attribute heads and pixel explanations.

``concepts``: attribute heads (``milcore.trust.concepts``: one logistic regression per WBCAtt-style attribute)
trained on the cells of 75 % of the patients of a ``morphology``-encoder bank and scored on the other 25 %
(macro-F1 per attribute, mean over attributes), for several patient splits. Target: macro-F1 >= 0.85.

``pixels``: a cross-validated ABMIL run on an ``efficientnet_lite0`` bank of the same cohort (a
convolutional, differentiable encoder); for every patient with diagnostic cells, Grad-CAM and integrated
gradients of the predicted class's bag logit through encoder and aggregator for its top-attention cells
(``milcore.trust.pixel_run.explain_pixels``), scored by the pointing game against the synthetic masks of the
cells' diagnostic features (Auer rod, granules, nucleus). Target: pointing-game accuracy >= 0.7 on
diagnostic cells; the chance levels (crop centre, a random point of the cell) are printed beside it.

    python benchmarks/bench_trust_cells.py --cohort runs/trust_cells/cohort --patients 60 --bag-median 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _milcore(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("milcore")), "-q", *args], check=True)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def concepts(cohort: Path, bank: Path, seeds: int) -> dict:
    """Held-out macro-F1 of the attribute heads over ``seeds`` patient splits."""
    from feature_cache.bank import open_reader
    from milcore.trust.concepts import ConceptConfig, heads_from_bank, read_cell_attributes

    rows = []
    with open_reader(bank) as reader:
        ids = reader.bag_ids()
        attrs = read_cell_attributes(cohort / "cells.csv", reader, ids)
        for seed in range(seeds):
            t0 = time.perf_counter()
            heads = heads_from_bank(reader, attrs, ids, ConceptConfig(seed=seed))
            ev = heads.evaluation
            rows.append({"seed": seed, "macro_f1": ev["macro_f1"], "seconds": round(time.perf_counter() - t0, 1),
                         "per_attribute": {a: ev[a].get("macro_f1") for a in heads.attributes},
                         "patients_heldout": ev["patients_heldout"], "encoder": reader.info.name})  # fmt: skip
    f1 = [r["macro_f1"] for r in rows]
    attrs_mean = {a: float(np.mean([r["per_attribute"][a] for r in rows])) for a in rows[0]["per_attribute"]}
    print(f"\n{'attribute':<20}{'macro-F1':>10}")
    for a, v in attrs_mean.items():
        print(f"{a:<20}{v:>10.3f}")
    print(f"{'MEAN':<20}{np.mean(f1):>10.3f}  (seeds {len(f1)}, min {min(f1):.3f}, max {max(f1):.3f})")
    return {"macro_f1_mean": float(np.mean(f1)), "macro_f1_min": float(min(f1)), "macro_f1_max": float(max(f1)),
            "per_attribute": attrs_mean, "rows": rows, "target_met": bool(np.mean(f1) >= 0.85)}  # fmt: skip


def pixels(cohort: Path, bank: Path, run: Path, args: argparse.Namespace) -> dict:
    """Pointing game of Grad-CAM and integrated gradients on the diagnostic top cells."""
    from feature_cache.bank import open_reader
    from milcore.crossval import train_run
    from milcore.data.predictions import read_attention, read_predictions
    from milcore.training.config import RunSpec, TrainConfig
    from milcore.trust.pixel_run import explain_pixels
    from milcore.trust.pixels import PixelConfig

    t0 = time.perf_counter()
    if not (run / "predictions.csv").exists():
        spec = RunSpec(bank=str(bank), cohort=str(cohort / "cohort.csv"), task="aml", folds=args.folds, seed=0,
                       n_boot=50)  # fmt: skip
        cfg = TrainConfig(model="abmil", epochs=args.epochs, patience=6, lr=1e-3, input_norm="standardize",
                          device="cpu", num_workers=0)  # fmt: skip
        train_run(spec, cfg, run, overwrite=True)
    t_train = time.perf_counter() - t0
    table = read_predictions(run)
    attention = read_attention(run)
    sick = [b for b, y in zip(table.bag_ids, table.labels, strict=True) if table.classes[y] != "control"]
    config = PixelConfig(cells_per_patient=args.cells, ig_steps=args.ig_steps)
    t1 = time.perf_counter()
    with open_reader(bank) as reader:
        result = explain_pixels(run, reader, table, attention, sick, cohort, config)
    t_explain = time.perf_counter() - t1
    summary = result.pointing_summary()
    cells = len(result.cells)
    print(f"\n{'method':<24}{'cells':>6}{'accuracy':>10}{'chance centre':>15}{'chance random':>15}")
    for m, s in summary.items():
        print(f"{m:<24}{s['cells']:>6}{s['accuracy']:>10.3f}{s['chance_centre']:>15.3f}"
              f"{s['chance_random_point']:>15.3f}")  # fmt: skip
        for f, fs in s["by_feature"].items():
            print(f"  {f:<22}{fs['cells']:>6}{fs['accuracy']:>10.3f}")
    from milcore.metrics.classification import balanced_accuracy

    ba = float(balanced_accuracy(table.labels, table.predicted, len(table.classes)))
    return {"pointing_game": summary, "cells_explained": cells, "patients": len(sick), "notes": result.notes[:20],
            "gradcam_layer": result.layer, "model_balanced_accuracy": ba, "seconds_train": round(t_train, 1),
            "seconds_explain": round(t_explain, 1), "seconds_per_cell": round(t_explain / max(cells, 1), 2),
            "target_met": {m: s["accuracy"] >= 0.7 for m, s in summary.items()}}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cohort", default="runs/trust_cells/cohort", help="synthetic cohort (written when absent)")
    p.add_argument("--patients", type=int, default=60)
    p.add_argument("--bag-median", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3, help="patient splits of the attribute heads")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--cells", type=int, default=3, help="top cells explained per patient")
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--parts", default="concepts,pixels")
    p.add_argument("--results", default=str(HERE / "results" / "trust_cells"))
    args = p.parse_args()
    cohort = Path(args.cohort)
    if not (cohort / "cohort.csv").exists():
        _milcore("synth", str(cohort), "--task", "aml", "--patients", str(args.patients), "--bag-median",
                 str(args.bag_median), "--seed", str(args.seed))  # fmt: skip
    out: dict = {"args": vars(args), "load_before": _load()}
    parts = args.parts.split(",")
    for encoder, part in (("morphology", "concepts"), ("efficientnet_lite0", "pixels")):
        if part not in parts:
            continue
        bank = cohort.parent / f"bank_{encoder}.h5"
        if not bank.exists():
            t0 = time.perf_counter()
            _milcore("extract", "--source", "synthetic", "--input", str(cohort), "--encoder", encoder, "--out",
                     str(bank), "--workers", "0")  # fmt: skip
            out[f"seconds_extract_{encoder}"] = round(time.perf_counter() - t0, 1)
        if part == "concepts":
            out["concepts"] = concepts(cohort, bank, args.seeds)
        else:
            out["pixels"] = pixels(cohort, bank, cohort.parent / "run_efficientnet", args)
    out["load_after"] = _load()
    print(f"load average before {out['load_before']} after {out['load_after']}")
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "trust_cells.json").write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
