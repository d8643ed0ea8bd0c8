"""Benchmark: end-to-end feature extraction vs the bare encoder, channels-last, and memory vs bag count.

For each encoder, in one run on the same crops:

- ``bare``: the encoder's forward pass on crops already decoded, transformed and stacked in memory
  (the ceiling: no I/O, no decoding, no resizing);
- ``end to end``: ``feature_cache.extract`` from a crop folder of PNG files into a new bank
  (DataLoader workers decode and transform while the encoder runs, bank writes included).

The ratio end-to-end / bare shows how close the input pipeline keeps the encoder to its ceiling
(target on CUDA: >= 0.8). An encoder written ``NAME@S`` runs at input side ``S``
(``efficientnet_lite0@96``: the synthetic crops' own size).

**Channels-last** (``--channels``): the bare forward pass of ``efficientnet_lite0`` with the module
and input in channels-last memory format (what encoders do) vs contiguous NCHW, interleaved
rounds, best round of each.

**Memory** (``--memory-bags 8,80``): extraction with the real encoder (``--memory-encoder``, default
``efficientnet_lite0`` at 96 px) and DataLoader worker streaming (``--memory-workers``, default 2)
over two cohorts whose bag counts differ 10x (same bag size), each in a fresh subprocess. After
each bag is written the main process's resident memory and the largest worker's are sampled; the
*growth* is the median RSS over the last quarter of the bags minus that over the first quarter
after the warm-up bags (allocator, first batches). Claim: memory does not grow with the number of
bags, i.e. the large run's growth stays within ``max(16 MB, 10%)`` of the data that streamed through
the main process (the transformed pixels and float32 features of every cell: what keeping every bag
would retain). The extractor hands freed heap memory back to the OS (``malloc_trim``, at most once a
second); without it RSS drifted by 0-49 MB over 80 bags with no array kept.
``--keep-bags`` makes the subprocess keep every bag it read in a list (a deliberate leak) to show
that this check fails when memory does grow.

Usage:
    python benchmarks/bench_extract.py [--encoders toy,morphology,efficientnet_lite0,efficientnet_lite0@96]
        [--cells 2000] [--device auto] [--out DIR] [--quick] [--channels] [--memory-bags 8,80]
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

_MEMORY_SCRIPT = """
import json, sys
import psutil
from feature_cache.bank import writer as bank_writer
import feature_cache.extract as fx

spec = json.loads(sys.argv[1])
me = psutil.Process()
trace = []


def rss_mb(p):
    try:
        return p.memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


real_append = bank_writer.BankWriter.append


def append(self, *args, **kwargs):
    out = real_append(self, *args, **kwargs)
    workers = [rss_mb(c) for c in me.children(recursive=True)]
    trace.append([rss_mb(me), max(workers, default=0.0)])
    return out


bank_writer.BankWriter.append = append
if spec["keep_bags"]:  # a deliberate leak: the extractor keeps every bag it read
    kept = []
    real_items = fx._items

    def keeping(*args, **kwargs):
        for item in real_items(*args, **kwargs):
            kept.append(item)
            yield item

    fx._items = keeping
summary = fx.extract(fx.ExtractConfig(source="synthetic", input=spec["input"], encoder=spec["encoder"],
                                      encoder_options=spec["options"], out=spec["out"], device="cpu",
                                      num_workers=spec["workers"], batch_size=64))
# VmHWM: this process image's high-water mark (ru_maxrss would also count the parent's pages shared at
# fork, before exec: a big parent makes every child "peak" at the parent's size)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"trace": trace, "cells": summary.cells, "peak_self_mb": hwm / 1024}))
"""

#: Bags written before the growth baseline is taken (allocator warm-up, first batches).
WARMUP_BAGS = 2


def memory_run(root: Path, bags: int, cells_per_bag: int, encoder: str, image_size: int | None, workers: int,
               keep_bags: bool = False, seed: int = 1) -> dict:  # fmt: skip
    """Extract a synthetic cohort of ``bags`` equal-sized bags in a fresh subprocess; its memory trace.

    Returns:
        ``bags``, ``cells``, ``peak_self_mb`` (the main process's high-water mark, start-up included),
        ``rss_warm_mb`` / ``rss_end_mb`` (median main RSS over the first / last quarter of the bags after
        the warm-up), ``growth_mb`` (their difference), ``worker_rss_max_mb`` (largest worker RSS sampled
        after a bag; a forked worker's own high-water mark starts at its parent's, so it is sampled),
        ``data_mb`` (transformed pixels + float32 features of every cell: what keeping every bag would
        retain) and the per-bag ``trace``.
    """
    import json

    from feature_cache.encoders import create_encoder

    root.mkdir(parents=True, exist_ok=True)
    config = root / f"cohort_{bags}.json"
    config.write_text(json.dumps({"task": "aml", "patients": bags, "seed": seed, "bag_median": cells_per_bag,
                                  "bag_sigma": 0.0, "bag_range": [cells_per_bag, cells_per_bag]}))  # fmt: skip
    options = {"image_size": image_size} if image_size else {}
    probe = create_encoder(encoder, device="cpu", **options)
    per_cell = 3 * probe.input_size**2 + 4 * probe.dim  # uint8 pixels + float32 features
    out = root / f"bank_{bags}{'_kept' if keep_bags else ''}.h5"
    if out.exists():
        out.unlink()
    spec = {"input": str(config), "encoder": encoder, "options": options, "out": str(out), "workers": workers,
            "keep_bags": keep_bags}  # fmt: skip
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(spec)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory run failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    main = [t[0] for t in out["trace"]]
    after = main[min(WARMUP_BAGS, len(main) - 1):]  # RSS after each bag, warm-up left out
    quarter = max(1, len(after) // 4)
    early, late = float(np.median(after[:quarter])), float(np.median(after[-quarter:]))
    return {"bags": bags, "cells": out["cells"], "keep_bags": keep_bags, "peak_self_mb": out["peak_self_mb"],
            "rss_warm_mb": early, "rss_end_mb": late,
            "growth_mb": late - early, "worker_rss_max_mb": max(t[1] for t in out["trace"]),
            "data_mb": out["cells"] * per_cell / 2**20, "trace": out["trace"]}  # fmt: skip


def growth_bound_mb(run: dict) -> float:
    """The most a run's RSS may grow after warm-up: ``max(16 MB, 10% of the data streamed through it)``."""
    return max(16.0, 0.1 * run["data_mb"])


def memory_section(root: Path, bag_counts: tuple[int, int], cells_per_bag: int, encoder: str,
                   image_size: int | None, workers: int, leak_check: bool = True) -> dict:  # fmt: skip
    """Both cohorts (and, with ``leak_check``, the large one again keeping every bag); the verdict."""
    small, large = (memory_run(root, n, cells_per_bag, encoder, image_size, workers) for n in bag_counts)
    out = {"encoder": encoder, "image_size": image_size, "workers": workers, "cells_per_bag": cells_per_bag,
           "warmup_bags": WARMUP_BAGS, "small": small, "large": large,
           "peak_ratio": large["peak_self_mb"] / small["peak_self_mb"],
           "bound_mb": growth_bound_mb(large), "holds": large["growth_mb"] <= growth_bound_mb(large)}  # fmt: skip
    if leak_check:
        leak = memory_run(root, bag_counts[1], cells_per_bag, encoder, image_size, workers, keep_bags=True)
        out["leak_check"] = {**leak, "detected": leak["growth_mb"] > growth_bound_mb(leak)}
    return out


def channels_last_section(image_size: int, cells: int, rounds: int) -> dict:
    """Bare efficientnet_lite0 forward passes, channels-last vs NCHW, interleaved; best round of each."""
    import torch

    from feature_cache.encoders import create_encoder

    encoder = create_encoder("efficientnet_lite0", device="cpu", image_size=image_size)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (cells, 3, image_size, image_size), dtype=np.uint8))
    module = encoder.module
    best = {"channels_last": float("inf"), "nchw": float("inf")}
    formats = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
    with torch.inference_mode():
        for r in range(rounds):
            for name in (("channels_last", "nchw") if r % 2 == 0 else ("nchw", "channels_last")):
                module.to(memory_format=formats[name])
                xi = x.contiguous(memory_format=formats[name])
                module(xi[:16])  # warm-up of this layout
                t0 = time.perf_counter()
                for s in range(0, cells, 64):
                    module(xi[s : s + 64])
                best[name] = min(best[name], time.perf_counter() - t0)
    return {"image_size": image_size, "cells": cells, "rounds": rounds, "threads": torch.get_num_threads(),
            "channels_last_cells_per_s": cells / best["channels_last"], "nchw_cells_per_s": cells / best["nchw"],
            "speedup": best["nchw"] / best["channels_last"]}  # fmt: skip


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


def _encoder_spec(text: str, image_size: int | None) -> tuple[str, dict]:
    """``NAME`` or ``NAME@S`` -> (name, encoder options)."""
    name, _, size = text.partition("@")
    size_value = int(size) if size else (image_size if name == "efficientnet_lite0" else None)
    return name, ({"image_size": size_value} if size_value else {})


def run(encoders: list[str], cells: int, device: str, workers: int, image_size: int | None,
        memory: dict | None = None, channels: dict | None = None) -> dict:  # fmt: skip
    """All measurements; returns the JSON-ready result."""
    from feature_cache.encoders import create_encoder
    from feature_cache.extract import ExtractConfig, extract
    from feature_cache.sources import create_source

    rows = []
    load = {"start": machine_info()["load_average"]}
    with tempfile.TemporaryDirectory() as tmp:
        root = _cohort(Path(tmp) / "crops", patients=max(4, cells // 250), cells=cells, seed=0)
        source = create_source("crops", root)
        crops = [c for b in source.bag_ids() for c in source.read_bag(b).pixels]
        for label in encoders:
            name, opts = _encoder_spec(label, image_size)
            try:
                encoder = create_encoder(name, device=device, **opts)
            except Exception as exc:  # e.g. weights not installed
                rows.append({"encoder": label, "error": str(exc)})
                continue
            batch = 256 if encoder.device.type == "cuda" else 64
            bare = _bare(encoder, crops, batch)
            out = Path(tmp) / f"{name}_{encoder.input_size}.h5"
            t0 = time.perf_counter()
            summary = extract(ExtractConfig(source="crops", input=str(root), encoder=name, out=str(out),
                                            device=device, num_workers=workers, encoder_options=opts,
                                            batch_size=batch))  # fmt: skip
            e2e = summary.cells / (time.perf_counter() - t0)
            rows.append({"encoder": label, "device": str(encoder.device), "input_size": encoder.input_size,
                         "dim": encoder.dim, "cells": summary.cells, "bare_cells_per_s": bare,
                         "end_to_end_cells_per_s": e2e, "ratio": e2e / bare,
                         "load_average": machine_info()["load_average"]})  # fmt: skip
        result_memory = memory_section(Path(tmp) / "memory", **memory) if memory else None
    return {
        "benchmark": "extract",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "load_average": {**load, "end": machine_info()["load_average"]},
        "workers": workers,
        "rows": rows,
        "memory": result_memory,
        "channels_last": channels_last_section(**channels) if channels else None,
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
    m = result.get("memory")
    if m:
        lines += ["", f"Memory: {m['encoder']} at {m['image_size'] or 'default'} px, {m['workers']} workers, "
                  f"{m['cells_per_bag']} cells per bag", "",
                  "| bags | cells | peak RSS MB (main) | largest worker RSS MB | RSS first quarter MB | "
                  "RSS last quarter MB | growth MB | data streamed MB | growth bound MB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        runs = [m["small"], m["large"]] + ([m["leak_check"]] if m.get("leak_check") else [])
        for r in runs:
            label = f"{r['bags']}" + (" (keeping every bag)" if r["keep_bags"] else "")
            lines.append(f"| {label} | {r['cells']:,} | {r['peak_self_mb']:.0f} | {r['worker_rss_max_mb']:.0f} | "
                         f"{r['rss_warm_mb']:.0f} | {r['rss_end_mb']:.0f} | {r['growth_mb']:+.1f} | "
                         f"{r['data_mb']:.0f} | {growth_bound_mb(r):.0f} |")  # fmt: skip
        verdict = "holds" if m["holds"] else "DOES NOT HOLD"
        lines += ["", f"Peak RSS (start-up included), large / small: x{m['peak_ratio']:.2f}. Growth after warm-up "
                  f"with {m['large']['bags']} bags: {m['large']['growth_mb']:+.1f} MB (bound {m['bound_mb']:.0f} MB): "
                  f"memory does not grow with the number of bags — {verdict}."]  # fmt: skip
        if m.get("leak_check"):
            leak = m["leak_check"]
            lines.append(f"Leak check (every bag kept): growth {leak['growth_mb']:+.1f} MB, "
                         f"{'detected' if leak['detected'] else 'NOT detected'} by the same bound.")  # fmt: skip
    c = result.get("channels_last")
    if c:
        lines += ["", f"Channels-last vs NCHW (efficientnet_lite0 at {c['image_size']} px, bare forward, "
                  f"{c['threads']} threads, best of {c['rounds']} interleaved rounds): "
                  f"{c['channels_last_cells_per_s']:,.0f} vs {c['nchw_cells_per_s']:,.0f} cells/s "
                  f"(x{c['speedup']:.2f})."]  # fmt: skip
    la = result.get("load_average") or {}
    if la:
        lines.append(f"Load average (1/5/15 min) at start {la.get('start')}, at end {la.get('end')}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default="toy,morphology,efficientnet_lite0,efficientnet_lite0@96")
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=-1, help="-1: automatic")
    parser.add_argument("--image-size", type=int, default=None, help="efficientnet_lite0 input side (default 224)")
    parser.add_argument("--memory-bags", default="8,80", help="two bag counts (default 8,80); 'none' to skip")
    parser.add_argument("--memory-cells", type=int, default=30, help="cells per bag in the memory runs")
    parser.add_argument("--memory-encoder", default="efficientnet_lite0@96", help="NAME or NAME@SIZE")
    parser.add_argument("--memory-workers", type=int, default=2)
    parser.add_argument("--no-leak-check", action="store_true", help="skip the deliberate-leak run")
    parser.add_argument("--channels", action="store_true", help="measure channels-last vs NCHW")
    parser.add_argument("--channels-size", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/extract"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (toy encoder, 200 cells)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.encoders, args.cells = "toy", 200
        args.memory_bags, args.memory_cells, args.memory_encoder, args.memory_workers = "3,6", 10, "toy", 0
        args.no_leak_check = True
    memory = None
    if args.memory_bags != "none":
        counts = tuple(int(v) for v in args.memory_bags.split(","))
        name, opts = _encoder_spec(args.memory_encoder, None)
        memory = {"bag_counts": counts, "cells_per_bag": args.memory_cells, "encoder": name,
                  "image_size": opts.get("image_size"), "workers": args.memory_workers,
                  "leak_check": not args.no_leak_check}  # fmt: skip
    channels = {"image_size": args.channels_size, "cells": 512, "rounds": 5} if args.channels else None
    encoders = [e for e in args.encoders.split(",") if e and e != "none"]
    result = run(encoders, args.cells, args.device, args.workers, args.image_size, memory, channels)
    save_bench(args.out, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
