"""Benchmark: MIL on real blood cells (BloodMNIST bags), official splits kept apart.

Bags of 50-400 real cells are built from BloodMNIST's train split (training, with patient-level
5-fold cross-validation for model selection) and, separately, from its test split (evaluation
only). Positive bags hold 2-10% immature granulocytes among normal leukocytes. Features come from
the pretrained ``efficientnet_lite0`` encoder; the fold ensemble of the chosen aggregator predicts
the test bags. Reported: bag AUROC and balanced accuracy (with bootstrap CIs) and attention
instance-AUROC against the known immature granulocytes, on the test bags only.

Targets (issue 6): bag AUROC >= 0.9 and instance-AUROC >= 0.8 with ABMIL.
Synthetic labels on real cells test the MIL machinery; they are not a clinical result.

Usage:
    python benchmarks/bench_bloodmnist.py [--npz ../shared/data/bloodmnist/bloodmnist.npz]
        [--models abmil] [--train-bags 800] [--test-bags 200] [--image-size 96] [--epochs 40] [--seed 0]
        [--cache DIR] [--no-recipe] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from milcore.report.bench_io import machine_info, save_bench

log = logging.getLogger("bench_bloodmnist")

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodmnist" / "bloodmnist.npz"


def encode_split(npz: Path, split: str, image_size: int, cache: Path):
    """Features of every image of one official split, encoded once (cached in ``cache``).

    Bags drawn from a split share its images, so each image is encoded once and its row copied into
    every bag that holds it: the same features ``milcore extract --source bloodmnist`` writes (same
    encoder, same transform), at a fraction of the cost. The extraction pipeline itself is measured by
    ``bench_extract.py``.

    Returns:
        ``(features (n, D) float32, labels (n,), EncoderInfo)``.
    """
    import json

    import numpy as np

    from feature_cache.encoders import create_encoder
    from feature_cache.sources.bloodmnist import load_split

    encoder = create_encoder("efficientnet_lite0", image_size=image_size)
    images, labels = load_split(npz, split)
    stem = cache / f"{split}_efficientnet_lite0_{image_size}"
    card = {"encoder": encoder.info.to_dict(), "npz": str(npz), "split": split, "n": len(images)}
    cached = stem.with_suffix(".npy").exists() and stem.with_suffix(".json").exists()
    if cached and json.loads(stem.with_suffix(".json").read_text()) == card:
        return np.load(stem.with_suffix(".npy"), allow_pickle=False), labels, encoder.info
    t0 = time.perf_counter()
    features = encoder.encode(images, batch_size=128).astype(np.float32)  # (n, D)
    log.info("encoded %d %s images in %.1f s", len(images), split, time.perf_counter() - t0)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_name(stem.name + ".tmp.npy")
    np.save(tmp, features, allow_pickle=False)
    tmp.replace(stem.with_suffix(".npy"))
    stem.with_suffix(".json").write_text(json.dumps(card))
    return features, labels, encoder.info


def write_bag_bank(folder: Path, features, labels, info, out: Path) -> Path:
    """A bank of the bags in ``folder/bags.json`` whose rows are the split's encoded images."""
    import json

    import numpy as np

    from feature_cache.bank import open_writer
    from feature_cache.sources.bloodmnist import CELL_TYPES

    bags = json.loads((folder / "bags.json").read_text())["bags"]
    with open_writer(out, info, mode="w") as writer:
        for bag in sorted(bags):
            rows = np.asarray(bags[bag], dtype=np.int64)
            writer.append(bag, features[rows], cell_id=[f"c{j:04d}" for j in range(len(rows))],
                          cell_type=[CELL_TYPES[t] for t in labels[rows]], meta={"n_cells": len(rows)})  # fmt: skip
    return out


#: training recipe for real-cell features (see benchmarks/README.md for the ablation that chose it)
RECIPE = {"input_norm": "standardize", "instance_dropout": 0.5, "weight_decay": 0.05}
MODEL_DROPOUT = 0.5


def run(npz: Path, models: list[str], train_bags: int, test_bags: int, image_size: int, epochs: int,
        work: Path, cache: Path, seed: int = 0, recipe: bool = True) -> dict:  # fmt: skip
    """Build bags, encode, cross-validate on train bags, evaluate the fold ensemble on test bags."""
    from feature_cache.sources.bloodmnist import BloodMnistBags, make_bloodmnist_bags
    from milcore.crossval import train_run
    from milcore.models.registry import get_aggregator_entry
    from milcore.prediction import evaluate_predictions, predict
    from milcore.training.config import RunSpec, TrainConfig

    t0 = time.perf_counter()
    sets = {}
    for split, n in (("train", train_bags), ("test", test_bags)):
        features, labels, info = encode_split(npz, split, image_size, cache)
        folder = make_bloodmnist_bags(npz, work / split, BloodMnistBags(split=split, bags=n, seed=seed))
        sets[split] = (folder, write_bag_bank(folder, features, labels, info, work / f"{split}.h5"))
    t_extract = time.perf_counter() - t0
    rows = []
    for model in models:
        t1 = time.perf_counter()
        folder, bank = sets["train"]
        spec = RunSpec(str(bank), str(folder / "cohort.csv"), "left_shift", folds=5, seed=seed, n_boot=200)
        options: dict = dict(RECIPE) if recipe else {}
        fields = {f.name for f in dataclasses.fields(get_aggregator_entry(model).config_class)}
        if recipe and "dropout" in fields:
            options["model_args"] = {"dropout": MODEL_DROPOUT}
        config = TrainConfig(model=model, epochs=epochs, seed=seed, **options)
        cv = train_run(spec, config, work / f"run_{model}", overwrite=True).metrics
        test_folder, test_bank = sets["test"]
        checkpoints = sorted(p.parent for p in (work / f"run_{model}").glob("fold_*/checkpoint.json"))
        predict(checkpoints, test_bank, out=work / f"test_{model}")
        m = evaluate_predictions(work / f"test_{model}", test_folder / "cohort.csv", "left_shift", test_bank)
        rows.append({
            "model": model,
            "train_options": {k: v for k, v in config.to_dict().items() if k in {*RECIPE, "model_args", "epochs"}},
            "cv_auroc": cv["mean"]["auroc"]["mean"],
            "cv_balanced_accuracy": cv["mean"]["balanced_accuracy"]["mean"],
            "test_auroc": m["metrics"]["auroc"]["value"], "test_auroc_ci95": m["metrics"]["auroc"]["ci95"],
            "test_balanced_accuracy": m["metrics"]["balanced_accuracy"]["value"],
            "test_balanced_accuracy_ci95": m["metrics"]["balanced_accuracy"]["ci95"],
            "test_instance_auroc": m.get("instance", {}).get("instance_auroc", float("nan")),
            "seconds": time.perf_counter() - t1,
        })  # fmt: skip
    return {
        "benchmark": "bloodmnist",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "setup": {"train_bags": train_bags, "test_bags": test_bags, "image_size": image_size, "epochs": epochs,
                  "witness": "immature_granulocyte 2-10%", "bag_size": "50-400", "encoder": "efficientnet_lite0",
                  "recipe": RECIPE if recipe else "defaults", "seed": seed},
        "encode_and_write_seconds": t_extract,
        "rows": rows,
        "targets": {"test_auroc": 0.9, "test_instance_auroc": 0.8},
    }  # fmt: skip


def format_table(result: dict) -> str:
    """Markdown table."""
    lines = ["| model | CV AUROC | CV bal. acc. | test AUROC [95% CI] | test bal. acc. [95% CI] | "
             "test instance-AUROC |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        lo, hi = r["test_auroc_ci95"]
        blo, bhi = r["test_balanced_accuracy_ci95"]
        lines.append(f"| {r['model']} | {r['cv_auroc']:.3f} | {r['cv_balanced_accuracy']:.3f} | "
                     f"{r['test_auroc']:.3f} [{lo:.3f}, {hi:.3f}] | {r['test_balanced_accuracy']:.3f} "
                     f"[{blo:.3f}, {bhi:.3f}] | {r['test_instance_auroc']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--models", default="abmil")
    parser.add_argument("--train-bags", type=int, default=800)
    parser.add_argument("--test-bags", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the encoded splits here and reuse them (default: a temporary folder)")
    parser.add_argument("--no-recipe", action="store_true",
                        help="train with TrainConfig defaults instead of the real-cell recipe")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bloodmnist"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.npz.exists():
        log.warning("skipped: BloodMNIST not found at %s (../shared/data is absent)", args.npz)
        return 0
    if args.quick:
        args.train_bags, args.test_bags, args.epochs, args.image_size = 20, 10, 2, 32
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.npz, args.models.split(","), args.train_bags, args.test_bags, args.image_size,
                     args.epochs, Path(tmp), args.cache or Path(tmp) / "cache", args.seed,
                     not args.no_recipe)  # fmt: skip
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
