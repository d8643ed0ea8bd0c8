"""Benchmark: MIL on real blood cells (BloodMNIST bags), official splits kept apart.

Bags of 50-400 real cells are built from BloodMNIST's train split (training, with patient-level
5-fold cross-validation for model selection) and, separately, from its test split (evaluation
only). Positive bags hold 2-10% immature granulocytes among normal leukocytes. Features come from
the pretrained ``efficientnet_lite0`` encoder; the fold ensemble of the chosen aggregator predicts
the test bags. Reported: bag AUROC and balanced accuracy (with bootstrap CIs) and attention
instance-AUROC against the known immature granulocytes, on the test bags only.

Targets (issue 6): bag AUROC >= 0.9 and instance-AUROC >= 0.8 with ABMIL.
Synthetic labels on real cells test the MIL machinery; they are not a clinical result.

``--recipe`` picks the training options: ``full`` (the real-cell recipe, default), ``defaults``
(``TrainConfig`` defaults; ``--no-recipe`` is the same) or ``standardize`` (defaults plus
standardised features): the ablation rows of ``benchmarks/README.md``.

``--probe`` instead measures what the features allow at the cell level: a *supervised* logistic probe
(immature granulocytes vs the five background types, standardised features, class-balanced) trained
on the train split's cells and scored on the test split's (instance-AUROC), the same probe in 5-fold
cross-validation inside the test split at each ``--probe-sizes`` input side (does 224 px help over
96 px?), and a check that ``milcore extract --source bloodmnist`` writes the same features as the rows
this script copies (largest absolute difference over a few bags).

Usage:
    python benchmarks/bench_bloodmnist.py [--npz ../shared/data/bloodmnist/bloodmnist.npz]
        [--models abmil] [--train-bags 800] [--test-bags 200] [--image-size 96] [--epochs 40] [--seed 0]
        [--cache DIR] [--recipe full|defaults|standardize] [--out DIR] [--quick]
    python benchmarks/bench_bloodmnist.py --probe [--probe-sizes 96,224] [--cache DIR] [--out DIR]
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
#: ``--recipe`` choices: training options, and whether the aggregator gets ``dropout=MODEL_DROPOUT``.
RECIPES: dict[str, tuple[dict, bool]] = {
    "full": (RECIPE, True),
    "defaults": ({}, False),
    "standardize": ({"input_norm": "standardize"}, False),
}


def run(npz: Path, models: list[str], train_bags: int, test_bags: int, image_size: int, epochs: int,
        work: Path, cache: Path, seed: int = 0, recipe: str = "full") -> dict:  # fmt: skip
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
        options, model_dropout = dict(RECIPES[recipe][0]), RECIPES[recipe][1]
        fields = {f.name for f in dataclasses.fields(get_aggregator_entry(model).config_class)}
        if model_dropout and "dropout" in fields:
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
                  "recipe": recipe, "recipe_options": RECIPES[recipe][0], "seed": seed},
        "encode_and_write_seconds": t_extract,
        "rows": rows,
        "targets": {"test_auroc": 0.9, "test_instance_auroc": 0.8},
    }  # fmt: skip


def probe(npz: Path, sizes: list[int], cache: Path, work: Path, seed: int = 0, check_bags: int = 4) -> dict:
    """Cell-level logistic probes on the encoded splits, and the extraction-equivalence check."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from feature_cache.sources.bloodmnist import CELL_TYPES, BloodMnistBags

    witness = CELL_TYPES.index("immature_granulocyte")
    kinds = [CELL_TYPES.index(t) for t in (*BloodMnistBags().background, "immature_granulocyte")]

    def cells(split: str, size: int):
        x, y, _ = encode_split(npz, split, size, cache)
        keep = np.isin(y, kinds)
        return x[keep], (y[keep] == witness).astype(int)

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))

    t0 = time.perf_counter()
    base = sizes[0]
    xtr, ytr = cells("train", base)
    xte, yte = cells("test", base)
    fitted = model().fit(xtr, ytr)
    train_to_test = float(roc_auc_score(yte, fitted.decision_function(xte)))
    within_test = {}
    for size in sizes:
        x, y = cells("test", size)
        folds = StratifiedKFold(5, shuffle=True, random_state=seed)
        scores = np.empty(len(y))
        for tr, te in folds.split(x, y):
            scores[te] = model().fit(x[tr], y[tr]).decision_function(x[te])
        within_test[str(size)] = float(roc_auc_score(y, scores))
    return {"train_to_test_instance_auroc": train_to_test, "image_size": base,
            "train_cells": len(ytr), "test_cells": len(yte), "test_witnesses": int(yte.sum()),
            "test_split_5fold_cv_instance_auroc": within_test, "seconds": time.perf_counter() - t0,
            "extract_equivalence": extract_equivalence(npz, base, cache, work, check_bags, seed)}  # fmt: skip


def extract_equivalence(npz: Path, image_size: int, cache: Path, work: Path, bags: int, seed: int) -> dict:
    """``milcore extract --source bloodmnist`` on a few test-split bags vs the rows this script copies."""
    import numpy as np

    from feature_cache.bank import open_reader
    from feature_cache.extract import ExtractConfig, extract
    from feature_cache.sources.bloodmnist import BloodMnistBags, make_bloodmnist_bags

    features, labels, info = encode_split(npz, "test", image_size, cache)
    folder = make_bloodmnist_bags(npz, work / "check", BloodMnistBags(split="test", bags=bags, seed=seed,
                                                                       bag_range=(20, 60)))  # fmt: skip
    copied = write_bag_bank(folder, features, labels, info, work / "check_copied.h5")
    extract(ExtractConfig(source="bloodmnist", input=str(folder), encoder="efficientnet_lite0",
                          encoder_options={"image_size": image_size}, out=str(work / "check_extracted.h5"),
                          device="cpu", num_workers=0))  # fmt: skip
    with open_reader(copied) as a, open_reader(work / "check_extracted.h5") as b:
        ids = a.bag_ids()
        assert ids == b.bag_ids()
        diff = max(float(np.abs(a.read(i).astype(np.float32) - b.read(i).astype(np.float32)).max()) for i in ids)
        scale = max(float(np.abs(a.read(i).astype(np.float32)).max()) for i in ids)
        cells = int(sum(len(a.read(i)) for i in ids))
    return {"bags": bags, "cells": cells, "max_abs_difference": diff, "max_abs_value": scale}


def format_probe(result: dict) -> str:
    """Markdown lines of a probe run."""
    p = result["probe"]
    eq = p["extract_equivalence"]
    cv = ", ".join(f"{size} px {v:.3f}" for size, v in p["test_split_5fold_cv_instance_auroc"].items())
    return "\n".join([
        "| probe (immature granulocytes vs the 5 background types) | instance-AUROC |", "|---|---:|",
        f"| trained on the train split ({p['train_cells']:,} cells), scored on the test split ({p['test_cells']:,} "
        f"cells, {p['test_witnesses']} witnesses), {p['image_size']} px | {p['train_to_test_instance_auroc']:.3f} |",
        f"| 5-fold CV inside the test split | {cv} |", "",
        f"`milcore extract --source bloodmnist` vs the copied rows, {eq['bags']} bags ({eq['cells']} cells): largest "
        f"absolute difference {eq['max_abs_difference']:.2e} (largest value {eq['max_abs_value']:.2f}). "
        f"Load average {result['machine']['load_average']}.",
    ])  # fmt: skip


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
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="full",
                        help="training options: the real-cell recipe (full), TrainConfig defaults, or defaults with "
                             "standardised features")  # fmt: skip
    parser.add_argument("--no-recipe", action="store_true", help="same as --recipe defaults")
    parser.add_argument("--probe", action="store_true", help="cell-level logistic probes instead of MIL training")
    parser.add_argument("--probe-sizes", default="96,224", help="input sides of the within-test-split probe")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bloodmnist"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.npz.exists():
        log.warning("skipped: BloodMNIST not found at %s (../shared/data is absent)", args.npz)
        return 0
    if args.quick:
        args.train_bags, args.test_bags, args.epochs, args.image_size = 20, 10, 2, 32
    recipe = "defaults" if args.no_recipe else args.recipe
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        if args.probe:
            sizes = [int(v) for v in args.probe_sizes.split(",")]
            result = {"benchmark": "bloodmnist_probe", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "machine": machine_info(),
                      "probe": probe(args.npz, sizes, cache, Path(tmp), args.seed)}  # fmt: skip
            save_bench(args.out, result, format_probe(result))
            return 0
        result = run(args.npz, args.models.split(","), args.train_bags, args.test_bags, args.image_size,
                     args.epochs, Path(tmp), cache, args.seed, recipe)  # fmt: skip
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
