"""Training-recipe ablation on the demo's synthetic AML cohort (60 patients, 5 classes, 5-fold CV).

Each recipe (a set of ``TrainConfig`` options for ABMIL) is cross-validated with several split seeds
(the seed fixes the folds, the weights and the batching), and the table reports the 5-fold mean
balanced accuracy per seed, its mean over seeds, the macro AUROC and the attention instance-AUROC
against ``cells.csv``. Issue 6's targets: balanced accuracy >= 0.9, instance-AUROC >= 0.85.

The bank is the demo's (``make demo`` writes ``runs/demo/bank.h5``: 60 patients, pretrained
``efficientnet_lite0`` at 96 px). Finished run folders under ``--runs`` are reused when their
resolved ``config.yaml`` matches the recipe exactly (same bank, cohort, seed and options), so an
interrupted ablation continues where it stopped and a table can be rebuilt without retraining.

Usage:
    python benchmarks/bench_training_recipe.py [--bank runs/demo/bank.h5]
        [--cohort runs/demo/cohort/cohort.csv] [--recipes defaults,dropout08_d25] [--seeds 0,1,2]
        [--runs runs/bench_recipe] [--out benchmarks/results/training_recipe]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from milcore.report.bench_io import machine_info, save_bench

log = logging.getLogger("bench_training_recipe")

#: recipe name -> TrainConfig options (model abmil)
RECIPES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "standardize": {"input_norm": "standardize"},
    "multi_branch": {"model_args": {"multi_branch": True}},
    "dropout05": {"instance_dropout": 0.5},
    "dropout07": {"instance_dropout": 0.7, "epochs": 100, "patience": 20},
    "dropout08": {"instance_dropout": 0.8, "epochs": 120, "patience": 25},
    "dropout08_d25": {"instance_dropout": 0.8, "epochs": 120, "patience": 25, "model_args": {"dropout": 0.25}},
}
#: seeds run by default: three for the baseline and the chosen recipes, one for the side branches
DEFAULT_SEEDS: dict[str, tuple[int, ...]] = {"defaults": (0, 1, 2), "dropout08": (0, 1, 2),
                                             "dropout08_d25": (0, 1, 2), "dropout07": (0, 1)}  # fmt: skip


def _matches(run: Path, bank: str, cohort: str, seed: int, options: dict[str, Any]) -> bool:
    """Whether ``run`` is a finished run of exactly this recipe."""
    import yaml

    from milcore.training.config import TrainConfig

    if not (run / "metrics.json").exists() or not (run / "config.yaml").exists():
        return False
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    want = TrainConfig(model="abmil", seed=seed, **options).to_dict()
    spec = resolved.get("run", {})
    return (resolved.get("train") == json.loads(json.dumps(want)) and spec.get("bank") == bank
            and spec.get("cohort") == cohort and spec.get("seed") == seed and spec.get("folds") == 5)  # fmt: skip


def run(bank: str, cohort: str, recipes: list[str], seeds: list[int] | None, runs: Path) -> dict[str, Any]:
    """Cross-validate every recipe with its seeds (``seeds`` for all, or ``DEFAULT_SEEDS``), reusing runs."""
    import torch

    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    torch.set_num_threads(1)
    rows = []
    for name in recipes:
        options = RECIPES[name]
        per_seed = []
        for seed in seeds if seeds is not None else DEFAULT_SEEDS.get(name, (0,)):
            folder = runs / f"{name}_s{seed}"
            t0 = time.perf_counter()
            if _matches(folder, bank, cohort, seed, options):
                metrics = json.loads((folder / "metrics.json").read_text())
                log.info("%s seed %d: reusing %s", name, seed, folder)
            else:
                spec = RunSpec(bank, cohort, "aml", folds=5, seed=seed, n_boot=200)
                config = TrainConfig(model="abmil", seed=seed, **options)
                metrics = train_run(spec, config, folder, overwrite=True).metrics
            mean = metrics["mean"]
            per_seed.append({
                "seed": seed,
                "balanced_accuracy": mean["balanced_accuracy"]["mean"],
                "balanced_accuracy_sd_folds": mean["balanced_accuracy"]["sd"],
                "auroc": mean["auroc"]["mean"],
                "instance_auroc": metrics.get("instance", {}).get("instance_auroc", float("nan")),
                "seconds": metrics.get("seconds", time.perf_counter() - t0),
            })  # fmt: skip
        bas = [s["balanced_accuracy"] for s in per_seed]
        rows.append({
            "recipe": name, "options": options, "per_seed": per_seed,
            "balanced_accuracy_mean": statistics.fmean(bas),
            "balanced_accuracy_sd_seeds": statistics.stdev(bas) if len(bas) > 1 else 0.0,
            "auroc_mean": statistics.fmean(s["auroc"] for s in per_seed),
            "instance_auroc_mean": statistics.fmean(s["instance_auroc"] for s in per_seed),
        })  # fmt: skip
    return {
        "benchmark": "training_recipe",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "setup": {"bank": bank, "cohort": cohort, "task": "aml", "model": "abmil", "folds": 5},
        "rows": rows,
        "targets": {"balanced_accuracy": 0.9, "instance_auroc": 0.85},
    }


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: one row per recipe."""
    lines = ["| recipe | options | bal. acc. per seed | bal. acc. (mean ± sd over seeds) | AUROC | instance-AUROC |",
             "|---|---|---|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        seeds = ", ".join(f"{s['balanced_accuracy']:.3f}" for s in r["per_seed"])
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "TrainConfig defaults"
        lines.append(f"| {r['recipe']} | {opts} | {seeds} | {r['balanced_accuracy_mean']:.3f} ± "
                     f"{r['balanced_accuracy_sd_seeds']:.3f} | {r['auroc_mean']:.3f} | "
                     f"{r['instance_auroc_mean']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--bank", default="runs/demo/bank.h5")
    parser.add_argument("--cohort", default="runs/demo/cohort/cohort.csv")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {list(RECIPES)}")
    parser.add_argument("--seeds", default=None, help="split seeds for every recipe, e.g. 0,1,2 (default: "
                        "three for the baseline and the dropout08 recipes, fewer for the side branches)")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_recipe"), help="run folders (reused)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training_recipe"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = sorted(set(args.recipes.split(",")) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown} (known: {', '.join(RECIPES)})")
    if not Path(args.bank).exists():
        parser.error(f"{args.bank}: no such bank (run 'make demo' first, or pass --bank/--cohort)")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    result = run(args.bank, args.cohort, args.recipes.split(","), seeds, args.runs)
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
