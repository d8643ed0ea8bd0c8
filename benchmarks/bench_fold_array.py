"""Benchmark (issue 17): ``milcore bench aggregators`` as a job array (``--fold K``) + ``report merge`` vs one process.

On a synthetic cohort (``milcore synth --task all``, a bank of the hand-crafted ``morphology`` encoder,
on which ABMIL learns; inputs standardised per training fold) the script runs, each as its own ``milcore``
process the way a scheduler starts jobs:

1. the single-process benchmark (every fold of every seed);
2. one job per outer fold (``--fold K``), one after the other (on a cluster they run side by side);
3. ``milcore report merge`` of the parts.

It records the wall and CPU time of each (CPU of the child process from ``resource``), the array's
overhead (sum of the parts' wall time vs the single run: each job loads the bank and fingerprints it
again), the wall time an array of parallel jobs would take (the slowest part) and the merge time, and
checks that the merged ``runs`` and ``summary`` metrics equal the single-process ones (largest absolute
difference over every metric of every run and every summary mean/sd/CI). Prints a table and writes
``OUT/bench.json`` with the load average around every step.

Usage:
    python benchmarks/bench_fold_array.py [--task all] [--encoder morphology] [--models abmil,mean,dsmil]
                                          [--folds 5] [--seeds 0,1,2] [--epochs 20] [--patients 60]
                                          [--out benchmarks/results/bench_fold_array]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING = {"train_bags_per_s", "infer_ms_per_bag", "peak_mb", "fit_s", "cpu_s", "seconds", "cpu_seconds",
          "peak_mb_max"}  # fmt: skip


def load() -> float:
    return round(os.getloadavg()[0], 2)


def milcore(*args: str) -> dict[str, float]:
    """Run ``milcore ARGS`` in a fresh process (1 torch thread); its wall and CPU seconds and the load around it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    l0, t0 = load(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "milcore", *args, "--quiet"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):  # 1: a model failed (said in its table); anything else is a broken step
        sys.exit(f"milcore {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": l0, "load_after": load(), "rc": proc.returncode}


def numbers(value, path: str = "") -> dict[str, float]:
    """Every numeric leaf of ``value`` that is not a timing field, by its path."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in TIMING:
                out.update(numbers(v, f"{path}.{k}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(numbers(v, f"{path}[{i}]"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[path] = float(value)
    return out


def max_difference(a: dict, b: dict) -> tuple[float, int]:
    """Largest absolute difference over the numeric leaves of ``runs`` and ``summary`` (NaN == NaN), and their count."""
    na = numbers({"runs": a["runs"], "summary": a["summary"]})
    nb = numbers({"runs": b["runs"], "summary": b["summary"]})
    if set(na) != set(nb):
        return math.inf, len(na)
    worst = 0.0
    for k, v in na.items():
        w = nb[k]
        if math.isnan(v) and math.isnan(w):
            continue
        worst = max(worst, abs(v - w)) if math.isfinite(v) and math.isfinite(w) else (0.0 if v == w else math.inf)
    return worst, len(na)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="all", choices=("aml", "all", "anemia"))
    ap.add_argument("--encoder", default="morphology")
    ap.add_argument("--models", default="abmil,mean,dsmil")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, deleted)")
    ap.add_argument("--out", default="benchmarks/results/bench_fold_array")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="milcore_fold_array_"))
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, dict[str, float]] = {}
    steps["synth"] = milcore("synth", "--task", args.task, "--patients", str(args.patients), "--seed", "1",
                             "--bag-median", "60", "--bag-max", "300", "--overwrite", str(work / "cohort"))  # fmt: skip
    steps["extract"] = milcore("extract", "--source", "crops", "--input", str(work / "cohort"), "--encoder",
                               args.encoder, "--device", "cpu", "--overwrite", "--out", str(work / "bank.h5"))
    common = ["bench", "aggregators", "--bank", str(work / "bank.h5"), "--cohort", str(work / "cohort" / "cohort.csv"),
              "--task", args.task, "--models", args.models, "--peers", "none", "--folds", str(args.folds), "--seeds",
              args.seeds, "--epochs", str(args.epochs), "--workers", "1", "--threads", "1", "--device", "cpu",
              "--input-norm", "standardize", "--overwrite"]  # fmt: skip
    steps["single"] = milcore(*common, "--out", str(work / "single"))
    parts = []
    for k in range(args.folds):
        steps[f"fold_{k}"] = milcore(*common, "--fold", str(k), "--out", str(work / f"fold{k}"))
        parts.append(str(work / f"fold{k}"))
    steps["merge"] = milcore("report", "merge", *parts, "--out", str(work / "merged"), "--overwrite")
    single = json.loads((work / "single" / "bench.json").read_text())
    merged = json.loads((work / "merged" / "bench.json").read_text())
    diff, count = max_difference(single, merged)
    part_steps = [steps[f"fold_{k}"] for k in range(args.folds)]
    sums = {"wall_s": sum(p["wall_s"] for p in part_steps), "cpu_s": sum(p["cpu_s"] for p in part_steps)}
    result = {
        "benchmark": "bench --fold job array vs one process (issue 17)", "argv": sys.argv[1:],
        "cohort": {"task": args.task, "patients": args.patients, "encoder": args.encoder, "bags": single["bags"]},
        "models": args.models.split(","), "folds": args.folds, "seeds": args.seeds, "epochs": args.epochs,
        "runs": len(single["runs"]), "steps": steps, "parts_sum": sums,
        "array_wall_s_if_parallel": max(p["wall_s"] for p in part_steps) + steps["merge"]["wall_s"],
        "overhead_ratio_parts_vs_single_wall": sums["wall_s"] / steps["single"]["wall_s"],
        "overhead_ratio_parts_vs_single_cpu": sums["cpu_s"] / steps["single"]["cpu_s"],
        "max_abs_difference_runs_and_summary": diff, "numbers_compared": count,
        "equal": diff == 0.0, "cpus": os.cpu_count(),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    for name in ("table.md",):
        shutil.copyfile(work / "merged" / name, out / f"merged_{name}")
    print("| step | wall s | CPU s | load before -> after |\n|---|--:|--:|---|")
    for name, s in steps.items():
        print(f"| {name} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {s['load_before']:.1f} -> {s['load_after']:.1f} |")
    print(f"| {args.folds} parts, summed | {sums['wall_s']:.1f} | {sums['cpu_s']:.1f} | |")
    print(f"\n{len(single['runs'])} runs; parts / single: wall {result['overhead_ratio_parts_vs_single_wall']:.2f}x, "
          f"CPU {result['overhead_ratio_parts_vs_single_cpu']:.2f}x; as a parallel array: "
          f"{result['array_wall_s_if_parallel']:.1f} s (slowest part + merge) vs {steps['single']['wall_s']:.1f} s; "
          f"merged vs single: max |difference| {diff:g} over {count} numbers (runs + summary, "
          "timings aside)")  # fmt: skip
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
