"""Speed of the full default aggregator benchmark, profiled one fit per model, and what each change bought.

The full default benchmark (``milcore bench aggregators`` on the demo AML bank: every registered
aggregator x 5 folds x 3 seeds, ``BENCH_TRAIN``) is projected from one measured fit per model (seed 0,
outer fold 1) as ``15 x`` the sum of the fits' process CPU seconds; wall-clock on two idle cores with
the benchmark's two worker processes is that over 2. In the same run, for the models named by
``--compare`` it also trains the same fit in float32 (``amp=off``) beside ``amp=native`` (bfloat16
autocast where the CPU has AVX512-BF16/AMX), and times TransMIL's forward + backward on real bags
through the packed path (no padding) and the padded path (``forward_padded``), in float32 and bf16.
``--attention-only`` and ``--conv-only`` time the kernel forms alone (TransMIL's exact attention, its PPEG
convolution). ``--input-dtype-ab`` trains each model's fit twice over in the order A B B A: A gathers
float32 features (the model casts them), B gathers them in the compute dtype (what the trainer does for a
model declaring ``casts_input_first``); the outputs must be identical, the CPU seconds are compared.

On a machine shared with other jobs, wall-clock is inflated by the load; process CPU seconds much
less so (they still grow somewhat with cache and memory-bandwidth contention). The load average is
recorded before and after.

Usage: ``python benchmarks/bench_speed.py --bank runs/demo/bank.h5 --cohort runs/demo/cohort/cohort.csv
--task aml [--models a,b] [--compare abmil,transmil] [--out benchmarks/results/bench_speed]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("bench_speed")


def _fit(model: str, amp: str, ctx: dict[str, Any]) -> dict[str, Any]:
    from milcore.bench.aggregators import Task, run_task

    spec = ctx["spec"]
    ctx = {**ctx, "spec": spec.replace(train=replace(spec.train, amp=amp))}
    row = run_task(Task(model, False, 0, 0), ctx)
    keep = ("status", "error", "cpu_s", "fit_s", "epochs_run", "best_epoch", "balanced_accuracy", "auroc",
            "train_bags_per_s")  # fmt: skip
    return {"model": model, "amp": amp, **{k: row.get(k) for k in keep}}


def _transmil_paths(ctx: dict[str, Any], reps: int = 3) -> list[dict[str, Any]]:
    """Forward + backward CPU seconds of one TransMIL batch of real bags, packed vs padded, fp32 vs bf16."""
    from milcore.models import create_aggregator
    from milcore.ops import to_padded

    store = ctx["store"]
    fold = ctx["folds"][0][0]
    index = [store.bag_ids.index(b) for b in fold.train[:8]] if hasattr(store, "bag_ids") else list(range(8))
    batch = store.gather(np.asarray(index))
    x, ptr = batch.x.float(), batch.ptr
    torch.manual_seed(0)
    model = create_aggregator("transmil", in_dim=x.shape[1], num_classes=len(ctx["classes"])).train()
    out = []
    for dtype in (None, torch.bfloat16):
        for path in ("packed", "padded"):
            best = float("inf")
            for _ in range(reps):
                model.zero_grad()
                t0 = time.process_time()
                with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                    res = model(x, ptr) if path == "packed" else model.forward_padded(*to_padded(x, ptr))
                res.logits.float().sum().backward()
                best = min(best, time.process_time() - t0)
            out.append({"path": path, "dtype": "bf16" if dtype else "fp32", "cpu_s": best,
                        "bags": int(ptr.numel() - 1), "cells": int(ptr[-1])})  # fmt: skip
    return out


def attention_forms(lengths: tuple[int, ...] = (200, 600, 1342, 3000), reps: int = 5) -> list[dict[str, Any]]:
    """Forward + backward CPU seconds of exact attention of one 8-head, 64-d bag: plain products, plain products
    in blocks of query rows (TransMIL's ``blocked_attention``) and the fused kernel
    (``scaled_dot_product_attention``), float32 and bfloat16 (what ``EXPLICIT_MAX_TOKENS`` decides)."""
    import torch.nn.functional as F

    from milcore.models.transmil import blocked_attention

    forms = {
        "plain": lambda q, k, v: ((q @ k.transpose(-1, -2)) * 0.125).softmax(-1) @ v,
        "blocked": blocked_attention,
        "fused": F.scaled_dot_product_attention,
    }
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for n in lengths:
            q, k, v = (torch.randn(1, 8, n, 64, dtype=dtype, requires_grad=True) for _ in range(3))
            for name, form in forms.items():
                best = float("inf")
                for _ in range(reps):
                    t0 = time.process_time()
                    form(q, k, v).float().sum().backward()
                    best = min(best, time.process_time() - t0)
                out.append({"dtype": str(dtype).removeprefix("torch."), "tokens": n, "form": name, "cpu_s": best})
    return out


def conv_forms(sizes: list[int], dim: int = 512, batch: int = 8, reps: int = 3) -> list[dict[str, Any]]:
    """Forward + backward CPU seconds of TransMIL's PPEG convolution (7x7 depthwise, float32) over bags of
    ``sizes`` cells in batches of ``batch`` bags: torch's ``conv2d`` on one shared canvas of the batch's largest
    grid (the previous form), torch's ``conv2d`` per bag grid, and :func:`milcore.ops.depthwise.depthwise_conv2d`
    per bag grid (the current form)."""
    import torch.nn.functional as F

    from milcore.ops.depthwise import depthwise_conv2d

    sides = [math.isqrt(n - 1) + 1 for n in sizes if n > 0]
    batches = [sides[i : i + batch] for i in range(0, len(sides), batch)]
    weight = torch.randn(dim, 1, 7, 7, requires_grad=True)
    bias = torch.randn(dim, requires_grad=True)
    forms = {
        "torch conv2d, shared canvas": (lambda x: F.conv2d(x, weight, bias, padding=3, groups=dim), False),
        "torch conv2d, per bag": (lambda x: F.conv2d(x, weight, bias, padding=3, groups=dim), True),
        "depthwise_conv2d, per bag": (lambda x: depthwise_conv2d(x, weight, bias, (3, 3)), True),
    }
    out = []
    for name, (conv, per_bag) in forms.items():
        best = float("inf")
        for _ in range(reps):
            t0 = time.process_time()
            for group in batches:
                for part in [[s] for s in group] if per_bag else [group]:
                    side = max(part)
                    grid = torch.randn(len(part), side, side, dim).permute(0, 3, 1, 2).requires_grad_(True)
                    conv(grid).sum().backward()  # channels-last memory, as in the model
            best = min(best, time.process_time() - t0)
        out.append({"form": name, "cpu_s": best, "bags": len(sides), "batch": batch})
    return out


def _kernels(args: argparse.Namespace) -> int:
    """``--attention-only`` / ``--conv-only``: the kernel forms, one JSON each, and their tables."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.attention_only:
        rows = attention_forms()
        load = list(os.getloadavg())
        (out / "attention.json").write_text(json.dumps({"rows": rows, "threads": args.threads,
                                                        "load_average": load}, indent=1))  # fmt: skip
        lines = ["| dtype | tokens | plain CPU s | blocked CPU s | fused CPU s |", "|---|---|---|---|---|"]
        for r in rows[::3]:
            cell = {x["form"]: x["cpu_s"] for x in rows if x["dtype"] == r["dtype"] and x["tokens"] == r["tokens"]}
            lines.append(f"| {r['dtype']} | {r['tokens']} | {cell['plain']:.4f} | {cell['blocked']:.4f} | "
                         f"{cell['fused']:.4f} |")  # fmt: skip
        print("\n".join(lines) + f"\nload average (1 min) {load[0]:.1f}")
    if args.conv_only:
        if args.bank:
            from feature_cache.bank import open_reader

            sizes = [int(n) for n in open_reader(args.bank).bag_sizes()]
        else:  # log-uniform sizes 60-1,400 cells, as the synthetic cohort's
            sizes = np.exp(np.random.default_rng(0).uniform(np.log(60), np.log(1400), 60)).astype(int).tolist()
        rows = conv_forms(sizes)
        load = list(os.getloadavg())
        record = {"rows": rows, "bank": args.bank, "sizes": sizes, "threads": args.threads, "load_average": load}
        (out / "conv.json").write_text(json.dumps(record, indent=1))
        base = rows[0]["cpu_s"]
        lines = ["| PPEG 7x7 depthwise, fwd+bwd, all bags | CPU s | speed-up |", "|---|---|---|"]
        lines += [f"| {r['form']} | {r['cpu_s']:.3f} | {base / r['cpu_s']:.2f}x |" for r in rows]
        print("\n".join(lines) + f"\nload average (1 min) {load[0]:.1f}")
    return 0


def input_dtype_ab(models: list[str], ctx: dict[str, Any], out: Path) -> int:
    """``--input-dtype-ab``: CPU seconds of each model's fit (seed 0, outer fold 1) with float32 features (A)
    and features in the compute dtype (B), in the order A B B A; the two must give identical results."""
    from milcore.models.registry import aggregator_needs
    from milcore.training import trainer

    real = trainer.input_dtype
    rows = []
    _fit("mean", "native", ctx)  # warm-up: first touch of the bags and of the kernels, not counted
    for model in models:
        if not aggregator_needs(model).casts_input_first:
            continue
        fits = {"A": [], "B": []}
        for arm in "ABBA":
            trainer.input_dtype = real if arm == "B" else (lambda module, amp: torch.float32)
            try:
                fits[arm].append(_fit(model, "native", ctx))
            finally:
                trainer.input_dtype = real
        a, b = fits["A"], fits["B"]
        keys = ("epochs_run", "best_epoch", "balanced_accuracy", "auroc")
        same = all(x[k] == y[k] for x in a for y in b for k in keys)
        cpu_a, cpu_b = sum(f["cpu_s"] for f in a) / 2, sum(f["cpu_s"] for f in b) / 2
        epochs = a[0]["epochs_run"]
        rows.append({"model": model, "epochs": epochs, "cpu_s_float32": cpu_a, "cpu_s_compute_dtype": cpu_b,
                     "cpu_s_per_epoch_saved": (cpu_a - cpu_b) / epochs, "ratio": cpu_a / cpu_b,
                     "identical_results": same, "fits": fits})  # fmt: skip
        log.info("%s: %.2f -> %.2f CPU s (%.3fx), identical %s", model, cpu_a, cpu_b, cpu_a / cpu_b, same)
        (out / "input_dtype.partial.json").write_text(json.dumps(rows, indent=1, default=float))
    load = list(os.getloadavg())
    (out / "input_dtype.json").write_text(json.dumps({"rows": rows, "load_average_after": load}, indent=1,
                                                     default=float))  # fmt: skip
    lines = ["| model | epochs | CPU s per fit, float32 features | in the compute dtype | ratio "
             "| CPU s saved per epoch | identical results |", "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['epochs']} | {r['cpu_s_float32']:.2f} | {r['cpu_s_compute_dtype']:.2f} | "
              f"{r['ratio']:.3f}x | {r['cpu_s_per_epoch_saved']:.3f} | {'yes' if r['identical_results'] else 'NO'} |"
              for r in rows]  # fmt: skip
    print("\n".join(lines) + f"\nload average (1 min) {load[0]:.1f}")
    (out / "input_dtype.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["identical_results"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    from feature_cache.devices import cpu_flags
    from milcore.bench.aggregators import _load
    from milcore.bench.config import BENCH_TRAIN, BenchSpec
    from milcore.models import list_aggregators
    from milcore.training.loop import autocast_dtype

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank")
    p.add_argument("--cohort")
    p.add_argument("--task")
    p.add_argument("--models", default=None, help="comma-separated (default: every registered aggregator)")
    p.add_argument("--compare", default="abmil,transmil", help="models also trained in float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/bench_speed")
    p.add_argument("--attention-only", action="store_true", help="only the exact-attention forms (seconds)")
    p.add_argument("--conv-only", action="store_true", help="only the PPEG convolution forms (sizes from --bank)")
    p.add_argument("--input-dtype-ab", action="store_true",
                   help="each model's fit with float32 features vs features in the compute dtype (A B B A)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.attention_only or args.conv_only:
        return _kernels(args)
    models = args.models.split(",") if args.models else list_aggregators()
    compare = [m for m in args.compare.split(",") if m]
    spec = BenchSpec(args.bank, args.cohort, args.task, models=tuple(models), peers=(), seeds=(0,), train=BENCH_TRAIN)
    ctx = {"spec": spec, "tm": None, **_load(spec)}
    if args.input_dtype_ab:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return input_dtype_ab(models, ctx, out)
    load_before = list(os.getloadavg())
    t0, cpu0 = time.perf_counter(), time.process_time()
    native = "bf16" if autocast_dtype("native", torch.device("cpu")) is not None else "fp32"
    _fit("mean", "off", ctx)  # warm-up (first-touch of the bags, kernels): not counted
    fits = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in models:
        for amp in ("native", "off") if model in compare else ("native",):
            fits.append(_fit(model, amp, ctx))
            log.info("%s", fits[-1])
            (out / "fits.partial.json").write_text(json.dumps(fits, indent=1, default=float))  # survives a kill
    paths = _transmil_paths(ctx)
    per_model = {f["model"]: f["cpu_s"] for f in fits if f["amp"] == "native" and f["cpu_s"] is not None}
    fits_per_model = 5 * 3
    projected_cpu = fits_per_model * sum(per_model.values())
    fp32_model = {f["model"]: f["cpu_s"] for f in fits if f["amp"] == "off" and f["cpu_s"] is not None}
    result = {
        "benchmark": "speed", "bank": args.bank, "task": args.task, "threads": args.threads,
        "native_bf16_cpu": native == "bf16", "cpu_flags": sorted(f for f in cpu_flags() if "bf16" in f or "amx" in f),
        "fits": fits, "transmil_paths": paths,
        "projection": {"fits": fits_per_model * len(per_model), "cpu_s": projected_cpu,
                       "wall_s_two_idle_cores": projected_cpu / 2, "target_s": 900,
                       "per_model_cpu_s": per_model, "per_model_fp32_cpu_s": fp32_model},
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
    }  # fmt: skip
    lines = [f"| model | CPU s per fit (amp native = {native}) | CPU s fp32 | epochs | bal. acc. |",
             "|---|---|---|---|---|"]
    for m in models:
        nat = next(f for f in fits if f["model"] == m and f["amp"] == "native")
        fp = next((f for f in fits if f["model"] == m and f["amp"] == "off"), None)
        lines.append(f"| {m} | {nat['cpu_s'] or float('nan'):.1f} | {fp['cpu_s']:.1f} | {nat['epochs_run']} | "
                     f"{nat['balanced_accuracy'] or float('nan'):.3f} |" if fp else
                     f"| {m} | {nat['cpu_s'] or float('nan'):.1f} | - | {nat['epochs_run']} | "
                     f"{nat['balanced_accuracy'] or float('nan'):.3f} |")  # fmt: skip
    lines += ["", "| TransMIL fwd+bwd, 8 real bags | fp32 CPU s | bf16 CPU s |", "|---|---|---|"]
    for path in ("packed", "padded"):
        v = {r["dtype"]: r["cpu_s"] for r in paths if r["path"] == path}
        lines.append(f"| {path} | {v['fp32']:.3f} | {v['bf16']:.3f} |")
    proj = result["projection"]
    lines += ["", f"Projected full default benchmark ({proj['fits']} fits): {proj['cpu_s']:.0f} CPU s, "
              f"{proj['wall_s_two_idle_cores']:.0f} s wall on 2 idle cores (target 900 s). This run: "
              f"{result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU, load average (1 min) "
              f"{load_before[0]:.1f} -> {result['load_average_after'][0]:.1f}"]  # fmt: skip
    table = "\n".join(lines) + "\n"
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "table.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
