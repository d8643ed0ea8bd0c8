"""Benchmark: synthetic cohort generation throughput (crops/s) against the 1,000 crops/s target.

Measures, in one run and on the same cohort definition:

- ``render``: crop rendering alone (one process);
- ``render+png``: rendering and PNG encoding with the engine's encoder, and with Pillow's as a peer;
- ``files only``: writing the same number of already-encoded PNG files (the file system's own limit,
  which varies from disk to disk);
- ``write (1 worker)``: the full ``write_cohort`` to disk on one core;
- ``write (N workers)``: the same with worker processes.

The target (>= 1,000 crops/s on one core) is checked on render + PNG encoding, the generator's own
work; end-to-end figures are reported beside the file-system limit measured in the same run.

Usage:
    python benchmarks/bench_synthetic.py [--patients 20] [--workers 2] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from milcore.report.bench_io import machine_info, save_bench

log = logging.getLogger("bench_synthetic")

TARGET_CROPS_PER_S = 1000.0


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(patients: int, bag_median: int, workers: int, seed: int = 0) -> dict:
    """Run every measurement; returns the result dictionary (also written as JSON by :func:`main`)."""
    from PIL import Image

    from feature_cache.sources.synthetic import SynthConfig, SyntheticCohort, encode_png, write_cohort

    config = SynthConfig(task="aml", patients=patients, seed=seed, bag_median=bag_median, bag_sigma=0.3)
    cohort = SyntheticCohort(config)
    total = sum(p.n_cells for p in cohort.patients)
    crops: list[np.ndarray] = []

    def render() -> None:
        for p in cohort.patients:
            crops.extend(cohort.iter_crops(p))

    t_render = _time(render)
    t_png = _time(lambda: [encode_png(c) for c in crops])

    def pil_png() -> None:
        for c in crops:
            buf = io.BytesIO()
            Image.fromarray(c).save(buf, format="PNG", compress_level=1)

    t_pil = _time(pil_png)
    rows = [
        {"stage": "render", "crops_per_s": total / t_render},
        {"stage": "render+png (engine encoder)", "crops_per_s": total / (t_render + t_png)},
        {"stage": "render+png (Pillow, peer)", "crops_per_s": total / (t_render + t_pil)},
    ]
    encoded = [encode_png(c) for c in crops]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "files"
        folder.mkdir()
        t_files = _time(lambda: [(folder / f"{i}.png").write_bytes(b) for i, b in enumerate(encoded)])
        rows.append({"stage": "files only (file-system limit)", "crops_per_s": total / t_files})
        s1 = write_cohort(config, Path(tmp) / "one")
        rows.append({"stage": "write_cohort, 1 worker", "crops_per_s": s1.crops_per_second})
        if workers > 1:
            sn = write_cohort(config, Path(tmp) / "many", workers=workers)
            rows.append({"stage": f"write_cohort, {workers} workers", "crops_per_s": sn.crops_per_second})
    for row in rows:
        row["ratio_to_target"] = row["crops_per_s"] / TARGET_CROPS_PER_S
    one_core = next(r for r in rows if r["stage"] == "render+png (engine encoder)")
    return {
        "benchmark": "synthetic",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "cohort": {"patients": patients, "cells": total, "crop_size": config.crop_size},
        "target_crops_per_s": TARGET_CROPS_PER_S,
        "png_speedup_vs_pillow": t_pil / t_png,
        "ideal_one_worker_crops_per_s": total / (t_render + t_png + t_files),
        "rows": rows,
        "target_met": one_core["crops_per_s"] >= TARGET_CROPS_PER_S,
    }


def format_table(result: dict) -> str:
    """The result as a Markdown table."""
    lines = ["| stage | crops/s | x target (1,000/s) |", "|---|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['stage']} | {row['crops_per_s']:,.0f} | {row['ratio_to_target']:.2f} |")
    lines.append("")
    lines.append(f"PNG encoder vs Pillow (same crops): {result['png_speedup_vs_pillow']:.2f}x faster; "
                 f"render + encode + file-system time of one worker: {result['ideal_one_worker_crops_per_s']:,.0f}"
                 f" crops/s; target (>= 1,000 crops/s rendered and encoded on one core) met: "
                 f"{result['target_met']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--bag-median", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/synthetic"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.patients, args.bag_median = 2, 20
    result = run(args.patients, args.bag_median, args.workers)
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
