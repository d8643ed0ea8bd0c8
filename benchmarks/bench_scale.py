"""Benchmark (issue 17): how merge, bank size, random whole-bag reads and 2-process training input grow with rows.

For each scale (default 1 M, 3 M, 10 M and 30 M cell rows; about ``--mean-cells`` cells per bag, sizes
log-normal and clipped to a 100x range, so 30 M rows are 100,000 bags), the script:

1. writes ``--shards`` shard banks (HDF5, float16, the toy encoder's 32 features, per-bag checksums)
   through the bank writer, each holding a cell-count-balanced set of bags
   (:func:`feature_cache.distributed.balanced_assignment`), exactly what ``torchrun -m milcore extract``
   ranks write (synthetic features instead of encoded crops: the toy encoder would spend hours on 30 M
   crops on 2 cores and the bank does not know the difference);
2. merges them in a fresh process with :func:`feature_cache.distributed.merge_shards` (what rank 0
   runs): wall time, the resident memory before the merge (interpreter, imports, the bag order) and
   its peak during the merge (``VmRSS`` sampled every 50 ms); a streamed merge keeps it flat in rows;
3. records the merged bank's size on disk;
4. reads ``--reads`` random whole bags in a fresh process (bags/s, rows/s, MB/s; page cache warm:
   the bank was just written and fits in memory on this machine), best of three passes;
5. runs 2 processes that each read their instance-balanced share of the same global batches
   (:class:`milcore.training.distributed.DistributedBagSampler`, ``--batch-instances`` per global
   batch), packed as ``x (N, D)`` + ``ptr`` the way training gets them: rows/s of both together.

``--bags N`` keeps the number of bags fixed (cells per bag grow with the rows) to separate what grows
with rows from what grows with bags. Prints a table and writes ``OUT/bench.json`` with the load
average sampled around each step.

Usage:
    python benchmarks/bench_scale.py [--rows 1e6,3e6,10e6,30e6] [--dir /tmp/milcore_scale]
                                     [--out benchmarks/results/scale]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 32  # the toy encoder's width


def load() -> float:
    return round(os.getloadavg()[0], 2)


def bag_sizes(rows: int, mean: int, seed: int) -> np.ndarray:
    """Log-normal bag sizes clipped to [mean/10, mean*10] (100x spread), summing to about ``rows``."""
    rng = np.random.default_rng(seed)
    n = max(1, round(rows / mean))
    sizes = np.clip(rng.lognormal(np.log(mean) - 0.5 * 0.8**2, 0.8, size=n), mean // 10, mean * 10).astype(np.int64)
    sizes = np.maximum(1, np.round(sizes * rows / sizes.sum())).astype(np.int64)
    return sizes


def write_shards(folder: Path, sizes: np.ndarray, shards: int) -> tuple[list[Path], float]:
    """Shard banks of random float16 features through the bank writer; returns paths and seconds."""
    from feature_cache.bank import EncoderInfo, open_writer
    from feature_cache.distributed import balanced_assignment

    info = EncoderInfo(name="toy", version="1", weights_sha256="", transform="resize16", dim=DIM)
    pool = np.random.default_rng(0).standard_normal((1 << 20, DIM)).astype(np.float16)  # (R, D) rows to slice
    ids = [f"bag{i:06d}" for i in range(len(sizes))]
    parts = balanced_assignment(list(zip(ids, sizes.tolist(), strict=True)), shards)
    where = {b: i for i, b in enumerate(ids)}
    paths = []
    t0 = time.perf_counter()
    for r, part in enumerate(parts):
        path = folder / f"bank.shard{r}of{shards}.h5"
        with open_writer(path, info, mode="w", dtype="float16") as w:
            for bag in part:
                n = int(sizes[where[bag]])
                start = (where[bag] * 7919) % (len(pool) - n) if n < len(pool) else 0
                w.append(bag, pool[start : start + n], cell_id=np.arange(n))
        paths.append(path)
    return paths, time.perf_counter() - t0


CHILD_MERGE = """
import json, resource, sys, threading, time
sys.path.insert(0, {repo!r})
from feature_cache.bank import open_reader
from feature_cache.distributed import merge_shards

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

shards, out = {shards!r}, {out!r}
order = sorted(b for p in shards for b in open_reader(p).bag_ids())
before = rss_mb()
peak = [before]
done = threading.Event()
def watch():
    while not done.wait(0.05):
        peak[0] = max(peak[0], rss_mb())
threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
merge_shards(shards, out, order)
seconds = time.perf_counter() - t0
done.set()
peak[0] = max(peak[0], rss_mb())
print(json.dumps({{"seconds": seconds, "rss_before_merge_mb": before, "peak_rss_during_merge_mb": peak[0],
                  "merge_rss_growth_mb": peak[0] - before,
                  "process_high_water_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

CHILD_READ = """
import json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from feature_cache.bank import open_reader
r = open_reader({bank!r})
ids = r.bag_ids()
rng = np.random.default_rng(1)
best = None
for rep in range(3):
    pick = [ids[i] for i in rng.integers(0, len(ids), size={reads})]
    t0 = time.perf_counter(); rows = 0; nbytes = 0
    for b in pick:
        x = r.read(b); rows += len(x); nbytes += x.nbytes
    s = time.perf_counter() - t0
    row = {{"bags_per_s": len(pick) / s, "rows_per_s": rows / s, "mb_per_s": nbytes / s / 1e6}}
    best = row if best is None or row["bags_per_s"] > best["bags_per_s"] else best
print(json.dumps(best))
"""

CHILD_TRAIN_INPUT = """
import json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from feature_cache.bank import open_reader
from feature_cache.distributed import RankInfo
from milcore.training.distributed import DistributedBagSampler
rank = int(sys.argv[1])
r = open_reader({bank!r})
ids = r.bag_ids()
sizes = r.bag_sizes()
order = np.random.default_rng(7).permutation(len(ids))
sampler = DistributedBagSampler(sizes, {budget}, RankInfo(rank, 2))
batches = sampler.batches(order)[: {batches}]
t0 = time.perf_counter(); rows = 0
for _, share in batches:
    x, ptr = r.read_packed([ids[i] for i in share])  # (N, D), (b + 1,)
    rows += len(x)
print(json.dumps({{"rank": rank, "rows": rows, "seconds": time.perf_counter() - t0, "batches": len(batches)}}))
"""


def child(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_input(bank: Path, budget: int, batches: int) -> dict:
    code = CHILD_TRAIN_INPUT.format(repo=str(REPO), bank=str(bank), budget=budget, batches=batches)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    rows = sum(o["rows"] for o in outs)
    slowest = max(o["seconds"] for o in outs)
    return {"rows": rows, "rows_per_s": rows / slowest, "rank_rows": [o["rows"] for o in outs],
            "rank_seconds": [round(o["seconds"], 3) for o in outs], "wall_with_startup_s": wall}


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1e6,3e6,10e6,30e6", help="comma-separated row counts")
    ap.add_argument("--mean-cells", type=int, default=300)
    ap.add_argument("--bags", type=int, default=0,
                    help="fixed number of bags at every scale (cells per bag grow with rows); 0: rows / --mean-cells")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--reads", type=int, default=20000, help="random whole-bag reads per pass")
    ap.add_argument("--batch-instances", type=int, default=16384)
    ap.add_argument("--batches", type=int, default=200, help="global batches read by the 2 processes")
    ap.add_argument("--dir", default="/tmp/milcore_scale", help="scratch folder (deleted per scale)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale"))
    args = ap.parse_args()
    scales = [int(float(v)) for v in args.rows.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_out = []
    for rows in scales:
        folder = Path(args.dir) / f"rows{rows}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        mean = args.mean_cells if args.bags <= 0 else max(1, rows // args.bags)  # --bags: fixed bag count
        sizes = bag_sizes(rows, mean, seed=rows % 1000)
        row = {"rows": int(sizes.sum()), "bags": len(sizes), "bag_size_min_max": [int(sizes.min()), int(sizes.max())],
               "load_before": load()}  # fmt: skip
        shards, row["write_shards_s"] = write_shards(folder, sizes, args.shards)
        row["load_after_write"] = load()
        bank = folder / "bank.h5"
        row["merge"] = child(CHILD_MERGE.format(repo=str(REPO), shards=[str(p) for p in shards], out=str(bank)))
        row["load_after_merge"] = load()
        row["bank_bytes"] = du(bank)
        for p in shards:
            p.unlink()
        row["random_read"] = child(CHILD_READ.format(repo=str(REPO), bank=str(bank), reads=args.reads))
        row["train_input_2proc"] = train_input(bank, args.batch_instances, args.batches)
        row["load_after_reads"] = load()
        rows_out.append(row)
        print(f"{row['rows']:>11,} rows {row['bags']:>7,} bags: merge {row['merge']['seconds']:.1f} s, peak RSS "
              f"{row['merge']['peak_rss_during_merge_mb']:.0f} MB, bank {row['bank_bytes'] / 1e9:.2f} GB, random reads "
              f"{row['random_read']['bags_per_s']:.0f} bags/s, 2-proc input "
              f"{row['train_input_2proc']['rows_per_s']:.3g} rows/s (load {row['load_after_reads']})",
              flush=True)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        (out / "bench.json").write_text(json.dumps({"args": vars(args), "scales": rows_out,
                                                     "machine": {"cpu_count": os.cpu_count()}}, indent=2))  # fmt: skip
    base = rows_out[0]
    print("\n| rows | bags | write shards s | merge s | merge RSS MB (before -> peak) | bank GB | "
          "random bags/s | vs first | 2-proc input rows/s | load |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows_out:
        ratio = r["random_read"]["bags_per_s"] / base["random_read"]["bags_per_s"]
        r["random_read_vs_first"] = ratio
        print(f"| {r['rows']:,} | {r['bags']:,} | {r['write_shards_s']:.1f} | {r['merge']['seconds']:.1f} | "
              f"{r['merge']['rss_before_merge_mb']:.0f} -> {r['merge']['peak_rss_during_merge_mb']:.0f} | "
              f"{r['bank_bytes'] / 1e9:.2f} | {r['random_read']['bags_per_s']:.0f} | "
              f"{ratio:.2f} | {r['train_input_2proc']['rows_per_s']:.3g} | {r['load_after_reads']} |")  # fmt: skip
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "scales": rows_out,
                                                 "machine": {"cpu_count": os.cpu_count()}}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
