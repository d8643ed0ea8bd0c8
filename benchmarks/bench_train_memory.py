"""Benchmark: resident memory of training when bags stream from the bank, vs cohort size.

Writes two banks of random 512-d float16 features (``--small`` and ``--large`` bags, about 300
cells each), trains ABMIL for a few epochs on each in a fresh subprocess with the memory budget
set to 0 (so every batch is read from the bank by DataLoader workers), and reports each run's peak
resident memory (the main process's ``VmHWM`` plus the workers' ``ru_maxrss``). Target (issue 6): resident
memory does not grow with the cohort's size (large / small close to 1), while the in-memory mode
(budget large enough to hold the bags) is shown beside it for contrast.

Usage:
    python benchmarks/bench_train_memory.py [--small 200] [--large 1600] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from milcore.report.bench_io import machine_info, save_bench

log = logging.getLogger("bench_train_memory")

_TRAIN = """
import resource, sys, json
import numpy as np
from feature_cache.bank import open_reader
from milcore.training.config import TrainConfig
from milcore.data.store import FeatureStore
from milcore.training.trainer import Trainer
bank = open_reader(sys.argv[1])
budget = int(float(sys.argv[2]) * (1 << 30))
ids = bank.bag_ids()
labels = np.arange(len(ids)) % 2
store = FeatureStore(bank, ids, budget, labels=labels)
cfg = TrainConfig(model="abmil", epochs=int(sys.argv[3]), patience=100, num_workers=2, batch_instances=4096)
trainer = Trainer(cfg, bank.dim, 2)
half = len(ids) // 2
trainer.fit(store.view(ids[:half]), store.view(ids[half:]))
# VmHWM: this process image's own high-water mark (ru_maxrss also counts the parent's pages shared at fork,
# before exec); the workers fork without exec, so their ru_maxrss is their own RSS (shared pages included)
own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"in_memory": store.in_memory, "main_mb": own / 1024, "worker_mb": kids / 1024}))
"""


def _bank(path: Path, bags: int, dim: int, seed: int) -> Path:
    from feature_cache.bank import EncoderInfo, open_writer

    rng = np.random.default_rng(seed)
    info = EncoderInfo(name="random", version="1", weights_sha256="", transform="none", dim=dim)
    with open_writer(path, info, mode="w") as writer:
        for i in range(bags):
            n = int(np.clip(rng.lognormal(np.log(300), 0.5), 20, 1500))
            writer.append(f"b{i:05d}", rng.standard_normal((n, dim)).astype(np.float16))
    return path


def run(small: int, large: int, epochs: int, dim: int) -> dict:
    """Measure both cohort sizes in streaming and in-memory mode."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bags in (small, large):
            bank = _bank(Path(tmp) / f"bank_{bags}.h5", bags, dim, seed=bags)
            size_mb = bank.stat().st_size / 1e6
            for mode, budget in (("streaming", 0.0), ("in memory", 8.0)):
                t0 = time.perf_counter()
                res = subprocess.run([sys.executable, "-c", _TRAIN, str(bank), str(budget), str(epochs)],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                out = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append({"bags": bags, "bank_mb": size_mb, "mode": mode, "in_memory": out["in_memory"],
                             "main_peak_mb": out["main_mb"], "worker_peak_mb": out["worker_mb"],
                             "seconds": time.perf_counter() - t0})  # fmt: skip

    def peak(bags: int, mode: str) -> float:
        return next(r["main_peak_mb"] for r in rows if r["bags"] == bags and r["mode"] == mode)

    return {
        "benchmark": "train_memory",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "epochs": epochs,
        "dim": dim,
        "rows": rows,
        "streaming_growth": peak(large, "streaming") / peak(small, "streaming"),
        "in_memory_growth": peak(large, "in memory") / peak(small, "in memory"),
    }


def format_table(result: dict) -> str:
    """Markdown table."""
    lines = ["| bags | bank MB | mode | main peak RSS MB | worker peak RSS MB | seconds |",
             "|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['bags']} | {r['bank_mb']:.0f} | {r['mode']} | {r['main_peak_mb']:.0f} | "
                     f"{r['worker_peak_mb']:.0f} | {r['seconds']:.1f} |")  # fmt: skip
    lines += ["", f"Main-process peak RSS, large / small cohort: streaming x{result['streaming_growth']:.2f}, "
              f"in memory x{result['in_memory_growth']:.2f}."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_memory"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.small, args.large, args.epochs, args.dim = 6, 12, 1, 16
    result = run(args.small, args.large, args.epochs, args.dim)
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
