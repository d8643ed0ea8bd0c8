"""Benchmark: the demo (`make demo`) end to end: wall time per step and its headline metrics.

Runs ``milcore run experiments/demo.yaml --set out=OUT`` in a subprocess (the exact command `make demo`
runs), times each step from the runner's own log lines, samples the machine's load average while it
runs (the machine may be shared: the figure means little without it), and reads the headline back
from the run: 5-fold cross-validated balanced accuracy (mean ± sd over folds) and the fold ensemble's
balanced accuracy on the 20-patient external cohort. The README's demo figures come from here.

``--experiment experiments/audit_planted.yaml`` does the same for the planted-bias audit (headline:
the cross-validated balanced accuracy, the groups the audit flags, women's and men's balanced
accuracy and the corrected p of ``sex=F``).

Usage:
    python benchmarks/bench_demo.py [--run-dir /tmp/demo_bench] [--out benchmarks/results/demo]
    python benchmarks/bench_demo.py --reuse runs/demo     # read the metrics of a finished demo, no timing
    python benchmarks/bench_demo.py --experiment experiments/audit_planted.yaml --out benchmarks/results/audit_planted
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from milcore.report.bench_io import machine_info, save_bench

log = logging.getLogger("bench_demo")
_STEP = re.compile(r"\[\w+ (\d+)/(\d+)\] milcore (\w+)")
_DONE = re.compile(r"\[\w+ (\d+)/(\d+)\] done in ([0-9.]+) s")


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every ``period`` seconds until stopped."""

    def __init__(self, period: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self._halt = period, [], threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(os.getloadavg()[0])
            self._halt.wait(self.period)

    def stop(self) -> list[float]:
        self._halt.set()
        self.join()
        return self.samples


def audit_headline(run_dir: Path) -> dict:
    """The planted-bias audit's headline, read from its output folder."""
    cv = json.loads((run_dir / "abmil" / "metrics.json").read_text())
    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    synth = json.loads((run_dir / "cohort" / "synth.json").read_text())
    sex = {g["name"]: g for g in audit["groups"] if g["name"] in ("sex=F", "sex=M")}
    female = [c for c in audit["comparisons"] if c["group"] == "sex=F" and c["family"] == "primary"]
    ba = cv["mean"]["balanced_accuracy"]
    return {
        "cv_balanced_accuracy": {"mean": ba["mean"], "sd": ba["sd"], "per_fold": ba["values"]},
        "flagged_groups": audit["summary"]["flagged_groups"],
        "primary_flagged": audit["summary"]["primary_flagged"],
        "balanced_accuracy_by_sex": {k: v["metrics"]["balanced_accuracy"]["value"] for k, v in sex.items()},
        "sex_F_p_corrected": female[0]["p_corrected"] if female else None,
        "sampling_version": synth.get("sampling_version", 1),
        "cells": synth["cells"],
    }


def headline(run_dir: Path, experiment: str = "demo") -> dict:
    """The experiment's headline metrics, read from its output folder."""
    if experiment == "audit_planted":
        return audit_headline(run_dir)
    cv = json.loads((run_dir / "abmil" / "metrics.json").read_text())
    ext = json.loads((run_dir / "external_predictions" / "metrics.json").read_text())
    synth = json.loads((run_dir / "cohort" / "synth.json").read_text())
    ba = cv["mean"]["balanced_accuracy"]
    return {
        "cv_balanced_accuracy": {"mean": ba["mean"], "sd": ba["sd"], "per_fold": ba["values"]},
        "cv_auroc": cv["mean"]["auroc"]["mean"],
        "cv_instance_auroc": cv["mean"].get("instance_auroc", {}).get("mean"),
        "external_balanced_accuracy": ext["metrics"]["balanced_accuracy"]["value"],
        "external_balanced_accuracy_ci95": ext["metrics"]["balanced_accuracy"]["ci95"],
        "external_n": ext["n"],
        "sampling_version": synth.get("sampling_version", 1),
        "cells": synth["cells"],
    }


def run(run_dir: Path, experiment: Path = Path("experiments/demo.yaml")) -> dict:
    """Run the experiment into ``run_dir`` (replaced) and return timings, load and headline."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [str(Path(sys.executable).with_name("milcore")), "run", str(experiment), "--set", f"out={run_dir}"]
    sampler = LoadSampler()
    sampler.start()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = sampler.stop()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{experiment} failed with exit code {proc.returncode}")
    names = {int(m.group(1)): m.group(3) for m in _STEP.finditer(proc.stderr)}
    steps = [{"step": i, "command": names.get(i, "?"), "seconds": float(m.group(3))}
             for m in _DONE.finditer(proc.stderr) for i in [int(m.group(1))]]  # fmt: skip
    return {
        "command": " ".join(cmd),
        "wall_seconds": wall,
        "cpu_seconds": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "steps": steps,
        "load_average_samples": load,
        "load_average_min_max": [min(load), max(load)] if load else [],
        **headline(run_dir, experiment.stem),
    }


def format_table(result: dict) -> str:
    """Markdown: steps with seconds, then the headline."""
    lines = []
    if result.get("steps"):
        lines += ["| step | command | seconds |", "|---:|---|---:|"]
        lines += [f"| {s['step']} | {s['command']} | {s['seconds']:.1f} |" for s in result["steps"]]
        lo, hi = result["load_average_min_max"] or [float("nan")] * 2
        lines += ["", f"Whole run: {result['wall_seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU "
                  f"(load average {lo:.1f}-{hi:.1f} on {os.cpu_count()} CPUs)."]  # fmt: skip
    ba = result["cv_balanced_accuracy"]
    cv = (f"5-fold CV balanced accuracy {ba['mean']:.3f} ± {ba['sd']:.3f} (folds "
          + ", ".join(f"{v:.3f}" for v in ba["per_fold"]) + ")")  # fmt: skip
    if "flagged_groups" in result:
        by_sex = ", ".join(f"{k} {v:.3f}" for k, v in sorted(result["balanced_accuracy_by_sex"].items()))
        p = result["sex_F_p_corrected"]
        lines += [f"{cv}; balanced accuracy by sex: {by_sex}; flagged: {', '.join(result['flagged_groups']) or 'none'} "
                  f"(sex=F corrected p {p if p is None else f'{p:.4g}'}); cohort sampling version "
                  f"{result['sampling_version']}."]  # fmt: skip
    else:
        lines += [f"{cv}; AUROC {result['cv_auroc']:.3f}; external ({result['external_n']} patients) balanced "
                  f"accuracy {result['external_balanced_accuracy']:.3f}; cohort sampling version "
                  f"{result['sampling_version']}."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=Path("experiments/demo.yaml"))
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/milcore_demo_bench"))
    parser.add_argument("--reuse", type=Path, help="read a finished demo folder instead of running one")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    name = args.experiment.stem
    body = {"reused": str(args.reuse), **headline(args.reuse, name)} if args.reuse else run(args.run_dir,
                                                                                            args.experiment)
    result = {"benchmark": name, "machine": machine_info(), **body}
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
