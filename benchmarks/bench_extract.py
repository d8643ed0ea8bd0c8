"""Benchmark: end-to-end feature extraction vs the bare encoder, and extraction memory vs bag count.

For each encoder, in one run on the same crops:

- ``bare``: the encoder's forward pass on crops already decoded, transformed and stacked in memory
  (the ceiling: no I/O, no decoding, no resizing);
- ``end to end``: ``feature_cache.extract`` from a crop folder of PNG files into a new bank
  (DataLoader workers decode and transform while the encoder runs, bank writes included).

The ratio end-to-end / bare shows how close the input pipeline keeps the encoder to its ceiling
(target on CUDA: >= 0.8). Memory: peak resident memory of an extraction subprocess over a small
and a 4x larger cohort (target: it does not grow with the number of bags).

Usage:
    python benchmarks/bench_extract.py [--encoders toy,morphology,efficientnet_lite0] [--cells 2000]
        [--device auto] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from milcore.report.bench_io import machine_info, save_bench

log = logging.getLogger("bench_extract")

_RSS_SCRIPT = """
import resource, sys
from feature_cache.extract import ExtractConfig, extract
extract(ExtractConfig(source="crops", input=sys.argv[1], encoder="toy", out=sys.argv[2], num_workers=0))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _cohort(root: Path, patients: int, cells: int, seed: int) -> Path:
    from feature_cache.sources.synthetic import SynthConfig, write_cohort

    per = max(10, cells // patients)
    cfg = SynthConfig(task="aml", patients=patients, seed=seed, bag_median=per, bag_sigma=0.0, bag_range=(10, per * 4))
    write_cohort(cfg, root)
    return root


def _bare(encoder, crops: list[np.ndarray], batch: int) -> float:
    import torch

    x = torch.stack([encoder.transform(c) for c in crops])  # (n, 3, S, S) uint8, preloaded
    if encoder.device.type == "cuda":
        x = x.pin_memory()
    encoder.forward_batch(x[:batch])  # warm-up
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        encoder.forward_batch(x[s : s + batch])
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t0)


def run(encoders: list[str], cells: int, device: str, workers: int, image_size: int | None) -> dict:
    """All measurements; returns the JSON-ready result."""
    from feature_cache.encoders import create_encoder
    from feature_cache.extract import ExtractConfig, extract
    from feature_cache.sources import create_source

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = _cohort(Path(tmp) / "crops", patients=max(4, cells // 250), cells=cells, seed=0)
        source = create_source("crops", root)
        crops = [c for b in source.bag_ids() for c in source.read_bag(b).pixels]
        for name in encoders:
            opts = {"image_size": image_size} if image_size and name == "efficientnet_lite0" else {}
            try:
                encoder = create_encoder(name, device=device, **opts)
            except Exception as exc:  # e.g. weights not installed
                rows.append({"encoder": name, "error": str(exc)})
                continue
            batch = 256 if encoder.device.type == "cuda" else 64
            bare = _bare(encoder, crops, batch)
            out = Path(tmp) / f"{name}.h5"
            t0 = time.perf_counter()
            summary = extract(ExtractConfig(source="crops", input=str(root), encoder=name, out=str(out),
                                            device=device, num_workers=workers, encoder_options=opts,
                                            batch_size=batch))  # fmt: skip
            e2e = summary.cells / (time.perf_counter() - t0)
            rows.append({"encoder": name, "device": str(encoder.device), "input_size": encoder.input_size,
                         "dim": encoder.dim, "cells": summary.cells, "bare_cells_per_s": bare,
                         "end_to_end_cells_per_s": e2e, "ratio": e2e / bare})  # fmt: skip
        memory = {}
        for label, patients in (("small", 10), ("large", 40)):
            cohort = _cohort(Path(tmp) / f"mem_{label}", patients=patients, cells=patients * 60, seed=1)
            res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(cohort), str(Path(tmp) / f"m_{label}.h5")],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            memory[label] = {"bags": patients, "peak_rss_mb": int(res.stdout.strip().splitlines()[-1]) / 1024}
        memory["growth"] = memory["large"]["peak_rss_mb"] / memory["small"]["peak_rss_mb"]
    return {
        "benchmark": "extract",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "workers": workers,
        "rows": rows,
        "memory": memory,
        "target_ratio_cuda": 0.8,
    }


def format_table(result: dict) -> str:
    """Markdown tables of the result."""
    lines = ["| encoder | device | input | bare cells/s | end-to-end cells/s | end-to-end / bare |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['encoder']} | – | – | – | – | not available: {r['error']} |")
            continue
        lines.append(f"| {r['encoder']} | {r['device']} | {r['input_size']} | {r['bare_cells_per_s']:,.0f} | "
                     f"{r['end_to_end_cells_per_s']:,.0f} | {r['ratio']:.2f} |")  # fmt: skip
    m = result["memory"]
    lines += ["", f"Peak RSS of an extraction: {m['small']['peak_rss_mb']:.0f} MB for {m['small']['bags']} bags, "
              f"{m['large']['peak_rss_mb']:.0f} MB for {m['large']['bags']} bags (x{m['growth']:.2f})."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default="toy,morphology,efficientnet_lite0")
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=-1, help="-1: automatic")
    parser.add_argument("--image-size", type=int, default=None, help="efficientnet_lite0 input side (default 224)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/extract"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (toy encoder, 200 cells)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.encoders, args.cells = "toy", 200
    result = run(args.encoders.split(","), args.cells, args.device, args.workers, args.image_size)
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
