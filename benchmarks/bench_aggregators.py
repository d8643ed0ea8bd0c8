"""Aggregator benchmark: training throughput, peak memory and memory scaling, side by side with torchmil.

On the same in-memory bags (default 300 cells x 512 features, 2 threads) one run measures: the
forward + backward + SGD-step throughput (bags/s) of every registered aggregator, packed (``x`` + ``ptr``)
and padded (dense + mask) where a model has both paths, float32 and bf16 autocast; torchmil's ABMIL,
TransMIL and DSMIL (same architectures, their own ``compute_loss``), or ``not installed`` rows; a second
bag set of variable sizes (uniform in [n/3, 5n/3]) where padding costs; the peak memory of one step
(resident high-water mark on Linux, after ``malloc_trim``) and its log-log slope against bag size
(500..8,000 cells; >= 1.5 means quadratic).

Timings are interleaved round-robin (every case gets a short slice in every round) so that load from
other processes hits all cases alike, and every step is timed on its own. A case's headline bags/s is
``batch / fastest step`` (as ``timeit`` takes the minimum: the least disturbed run, which on a shared
machine is the one that measures the code); the median over rounds of the slice throughput is reported
too. Ratios are headline vs headline, with the median of the per-round ratios in brackets.

Usage: ``python benchmarks/bench_aggregators.py [--quick] [--out DIR] [--threads 2] [--rounds 10]``;
writes ``DIR/bench.json`` and ``DIR/table.md`` (default ``benchmarks/results/aggregators``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from milcore.bench.memory import peak_memory_mb
from milcore.bench.peers import build_torchmil, import_torchmil
from milcore.models import create_aggregator, list_aggregators
from milcore.ops import to_padded

DEFAULT_OUT = Path("benchmarks/results/aggregators")
log = logging.getLogger("bench_aggregators")
# our models as configured for the side-by-side rows: the peers' architectures where a peer exists
PEER_MATCHED = {"abmil": {"embed_dim": 0}, "dsmil": {"embed_dim": 0}, "transmil": {"num_heads": 4}}


@dataclass
class Case:
    """One benchmark row: an implementation, a batch layout, a batch size, a precision."""

    model: str
    impl: str  # "milcore" | "torchmil"
    layout: str  # "packed" | "padded"
    batch: int
    dtype: str  # "fp32" | "bf16"
    bags: str  # "fixed" | "variable"
    step: Callable[[], None] | None = None
    status: str = "ok"
    rates: list[float] = field(default_factory=list)
    fastest_s: float = math.inf
    peak_mb: float | None = None

    @property
    def key(self) -> str:
        return f"{self.impl}:{self.model}:{self.layout}:b{self.batch}:{self.dtype}:{self.bags}"

    @property
    def best(self) -> float:
        return self.batch / self.fastest_s if self.rates else 0.0

    def summary(self) -> dict[str, Any]:
        keep = ("model", "impl", "layout", "batch", "dtype", "bags", "status", "peak_mb")
        ok = bool(self.rates)
        return {"key": self.key, **{k: getattr(self, k) for k in keep}, "rounds": self.rates,
                "bags_per_s": self.best if ok else None, "fastest_step_s": self.fastest_s if ok else None,
                "bags_per_s_median": statistics.median(self.rates) if ok else None}  # fmt: skip


def make_pool(num_bags: int, n: int, dim: int, variable: bool, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(max(1, n // 3), 5 * n // 3 + 1, (num_bags,), generator=g) if variable else [n] * num_bags
    return [torch.randn(int(s), dim, generator=g) for s in sizes]


class Batches:
    """Fixed batches cut from a pool of bags, in packed and padded form, cycled through by the steps."""

    def __init__(self, pool: list[torch.Tensor], batch: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for start in range(0, len(pool) - batch + 1, batch):
            bags = pool[start : start + batch]
            ptr = F.pad(torch.tensor([len(b) for b in bags]).cumsum(0), (1, 0))
            x = torch.cat(bags)
            dense, mask = to_padded(x, ptr)
            self.items.append({"x": x, "ptr": ptr, "dense": dense, "mask": mask,
                               "y": torch.randint(0, 2, (batch,), generator=g)})  # fmt: skip
        self._cycle = itertools.cycle(self.items)

    def next(self) -> dict[str, torch.Tensor]:
        return next(self._cycle)


def _train_step(model: torch.nn.Module, batches: Batches, bf16: bool, loss_fn: Callable) -> Callable[[], None]:
    """One SGD step (forward, loss, backward, update) on the next batch, optionally under bf16 autocast."""
    opt = torch.optim.SGD(model.train().parameters(), lr=1e-4)

    def step() -> None:
        b = batches.next()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def milcore_step(name: str, batches: Batches, layout: str, bf16: bool, dim: int, overrides: dict) -> Callable:
    torch.manual_seed(0)
    model = create_aggregator(name, in_dim=dim, num_classes=2, **overrides)
    if hasattr(model, "fit_normal"):
        model.fit_normal(batches.items[0]["x"])

    def loss(b: dict) -> torch.Tensor:
        if layout == "packed":
            out = model(b["x"], b["ptr"], labels=b["y"])
        else:
            out = model.forward_padded(b["dense"], b["mask"], labels=b["y"])
        return F.cross_entropy(out.logits.float(), b["y"]) + sum(out.aux_losses.values())

    return _train_step(model, batches, bf16, loss)


def torchmil_step(tm: Any, name: str, batches: Batches, bf16: bool, dim: int) -> Callable:
    torch.manual_seed(0)
    model = build_torchmil(tm, name, dim)  # TransMIL: Nystrom, 256 landmarks, 4 heads, att_dim 512

    def loss(b: dict) -> torch.Tensor:  # their own training loss; torchmil's TransMIL takes no mask
        mask = () if name == "transmil" else (b["mask"],)
        return sum(model.compute_loss(b["y"].float(), b["dense"], *mask)[1].values())

    return _train_step(model, batches, bf16, loss)


def build_cases(args: argparse.Namespace) -> list[Case]:
    n, dim = args.cells, args.dim
    pools = {"fixed": make_pool(args.pool, n, dim, False, 0), "variable": make_pool(args.pool, n, dim, True, 1)}
    batches: dict[tuple[str, int], Batches] = {}
    tm = import_torchmil()
    cases: list[Case] = []

    def get(bags: str, b: int) -> Batches:
        if (bags, b) not in batches:
            batches[(bags, b)] = Batches(pools[bags], b, seed=b)
        return batches[(bags, b)]

    def ours(model: str, layout: str, b: int, dtype: str, bags: str = "fixed") -> None:
        case = Case(model, "milcore", layout, b, dtype, bags)
        case.step = milcore_step(model, get(bags, b), layout, dtype == "bf16", dim, PEER_MATCHED.get(model, {}))
        cases.append(case)

    def peer(model: str, b: int, dtype: str, bags: str = "fixed") -> None:
        case = Case(model, "torchmil", "padded", b, dtype, bags)
        if tm is None:
            case.status = "not installed"
        else:
            case.step = torchmil_step(tm, model, get(bags, b), dtype == "bf16", dim)
        cases.append(case)

    big, small_t = args.batch, args.transmil_batch
    for name in list_aggregators():
        has_padded = create_aggregator(name, in_dim=dim, num_classes=2).has_padded_path
        b = small_t if name == "transmil" else big
        for dtype in ("fp32", "bf16"):
            ours(name, "packed", b, dtype)
        if has_padded:
            ours(name, "padded", b, "fp32")
            ours(name, "packed", b, "fp32", "variable")
            ours(name, "padded", b, "fp32", "variable")
    large = args.large_batch
    for model, b, dtype in [("abmil", 1, "fp32"), ("abmil", large, "fp32"), ("abmil", large, "bf16"),
                            ("transmil", 1, "fp32"), ("transmil", 1, "bf16"), ("dsmil", 1, "fp32")]:  # fmt: skip
        ours(model, "packed", b, dtype)
    for model, b, dtype in [("abmil", 1, "fp32"), ("abmil", big, "fp32"), ("abmil", large, "fp32"),
                            ("abmil", big, "bf16"), ("abmil", large, "bf16"), ("transmil", 1, "fp32"),
                            ("transmil", small_t, "fp32"), ("transmil", 1, "bf16"), ("transmil", small_t, "bf16"),
                            ("dsmil", 1, "fp32"), ("dsmil", big, "fp32"), ("dsmil", big, "bf16")]:  # fmt: skip
        peer(model, b, dtype)
    peer("abmil", big, "fp32", "variable")
    return cases


def run_rounds(cases: list[Case], rounds: int, slice_s: float, min_steps: int) -> None:
    live = [c for c in cases if c.step is not None]
    for c in live:  # warm-up: allocator, oneDNN kernels, lazy init
        c.step(), c.step()
    for r in range(rounds):
        for c in live:
            t0 = last = time.perf_counter()
            steps = 0
            while steps < min_steps or last - t0 < slice_s:
                c.step()
                now = time.perf_counter()
                c.fastest_s, last, steps = min(c.fastest_s, now - last), now, steps + 1
            c.rates.append(steps * c.batch / (last - t0))
        log.info("round %d/%d done", r + 1, rounds)
    gc.collect()
    for c in live:
        c.peak_mb = peak_memory_mb(c.step)  # one step; after warm-up, so the optimizer state already exists


def memory_scaling(sizes: list[int], dim: int) -> dict[str, Any]:
    """Peak memory and step time of one bag of ``n`` cells, per aggregator; log-log slope of memory."""
    out: dict[str, Any] = {}
    gc.collect()
    for name in list_aggregators():
        rows = []
        for n in sizes:
            batches = Batches([torch.randn(n, dim, generator=torch.Generator().manual_seed(n))], 1, seed=0)
            step = milcore_step(name, batches, "packed", False, dim, {})
            step()
            t0 = time.perf_counter()
            peak = peak_memory_mb(step)
            rows.append({"cells": n, "peak_mb": peak, "step_s": time.perf_counter() - t0})
        pts = [(math.log(r["cells"]), math.log(r["peak_mb"])) for r in rows if r["peak_mb"]]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        slope = statistics.linear_regression(xs, ys).slope if len(set(xs)) >= 2 else None
        out[name] = {"rows": rows, "slope": slope, "quadratic": slope is not None and slope >= 1.5}
        log.info("scaling %s: slope %s", name, slope)
    return out


def best(cases: list[Case], **match: Any) -> Case | None:
    pool = [c for c in cases if c.rates and all(getattr(c, k) == v for k, v in match.items())]
    return max(pool, key=lambda c: c.best, default=None)


def ratio(a: Case | None, b: Case | None) -> float | None:
    return None if a is None or b is None else a.best / b.best


def paired_ratio(a: Case | None, b: Case | None) -> float | None:
    return None if a is None or b is None else statistics.median(x / y for x, y in zip(a.rates, b.rates, strict=True))


TARGETS = {"abmil": 1.5, "transmil": 5.0, "dsmil": None}  # ours / torchmil bags/s, from the issue


def ratios(cases: list[Case]) -> dict[str, Any]:
    """Ours (packed, best mode) vs torchmil (best mode as shipped, float32), plus like-for-like ratios."""
    out: dict[str, Any] = {}
    for model, target in TARGETS.items():

        def pick(impl: str, model: str = model, **kw: Any) -> Case | None:
            layout = {"layout": "packed"} if impl == "milcore" else {}
            return best(cases, impl=impl, model=model, bags="fixed", **layout, **kw)

        ours, peer32 = pick("milcore"), pick("torchmil", dtype="fp32")
        headline = ratio(ours, peer32)
        out[model] = {
            "label": f"our {model} (best mode) vs torchmil {model} (best mode as shipped, float32)",
            "target": target, "ratio": headline, "ratio_median_of_rounds": paired_ratio(ours, peer32),
            "met": None if headline is None or target is None else headline >= target,
            "ours_best": ours.key if ours else None, "peer_best_fp32": peer32.key if peer32 else None,
            "fp32_vs_fp32": ratio(pick("milcore", dtype="fp32"), peer32),
            "bf16_vs_bf16": ratio(pick("milcore", dtype="bf16"), pick("torchmil", dtype="bf16")),
            "best_vs_peer_best_any_precision": ratio(ours, pick("torchmil")),
        }  # fmt: skip
    return out


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def report(cases: list[Case], rat: dict[str, Any], scaling: dict[str, Any]) -> str:
    parts = ["| model | impl | layout | batch | dtype | bags | bags/s (fastest step) | median | peak MB |",
             "|" + "---|" * 9]  # fmt: skip
    for c in cases:
        s = c.summary()
        parts.append(f"| {c.model} | {c.impl} | {c.layout} | {c.batch} | {c.dtype} | {c.bags} | "
                     f"{fmt(s['bags_per_s']) if c.rates else c.status} | {fmt(s['bags_per_s_median'])} | "
                     f"{fmt(c.peak_mb)} |")  # fmt: skip
    parts += ["", "Ratios (fastest step vs fastest step; median of per-round ratios in brackets):"]
    for r in rat.values():
        verdict = "" if r["met"] is None else (" -> target MET" if r["met"] else " -> target NOT MET")
        target = f" (target >= {r['target']}x)" if r["target"] else ""
        parts.append(f"- {r['label']}: {fmt(r['ratio'], 2)}x [{fmt(r['ratio_median_of_rounds'], 2)}x]"
                     f"{target}{verdict}; float32 vs float32 "
                     f"{fmt(r['fp32_vs_fp32'], 2)}x, bf16 vs bf16 {fmt(r['bf16_vs_bf16'], 2)}x")  # fmt: skip
    sizes = [r["cells"] for r in next(iter(scaling.values()))["rows"]]
    parts += ["", "| aggregator | " + " | ".join(f"{n} cells MB" for n in sizes) + " | slope | quadratic |",
              "|" + "---|" * (3 + len(sizes))]  # fmt: skip
    for name, s in scaling.items():
        cells = " | ".join(fmt(r["peak_mb"]) for r in s["rows"])
        parts.append(f"| {name} | {cells} | {fmt(s['slope'], 2)} | {'yes' if s['quadratic'] else 'no'} |")
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (bench.json, table.md)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cells", type=int, default=300, help="cells per bag")
    p.add_argument("--dim", type=int, default=512, help="feature dim")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--large-batch", type=int, default=32)
    p.add_argument("--transmil-batch", type=int, default=4, help="batch size of the TransMIL rows")
    p.add_argument("--pool", type=int, default=64, help="bags in the pool cycled through")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--slice", type=float, default=0.25, help="seconds per case per round")
    p.add_argument("--min-steps", type=int, default=2)
    p.add_argument("--scaling", type=int, nargs="*", default=[500, 1000, 2000, 4000, 8000])
    args = p.parse_args(argv)
    if args.quick:
        args.cells, args.dim, args.batch, args.large_batch, args.transmil_batch, args.pool = 24, 32, 4, 8, 2, 16
        args.rounds, args.slice, args.min_steps, args.scaling = 2, 0.01, 1, [64, 128]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        t0, load_before = time.perf_counter(), os.getloadavg()
        cases = build_cases(args)
        run_rounds(cases, args.rounds, args.slice, args.min_steps)
        rat = ratios(cases)
        scaling = memory_scaling(args.scaling, args.dim)
        text = report(cases, rat, scaling)
    finally:
        torch.set_num_threads(threads_before)
    load = {"before": load_before, "after": os.getloadavg()}  # 1/5/15-min load averages of the machine
    print(f"{text}\nmachine load average (1/5/15 min) before {load['before']}, after {load['after']}")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "aggregators",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "threads": args.threads, "load_average": load},
        "cases": [c.summary() for c in cases], "ratios": rat, "memory_scaling": scaling,
        "quadratic_memory": [k for k, v in scaling.items() if v["quadratic"]],
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    (args.out / "bench.json").write_text(json.dumps(payload, indent=2))
    (args.out / "table.md").write_text(text + "\n")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
