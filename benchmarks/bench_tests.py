"""Benchmark: wall time of the test tiers (what `make test` and CI run), with the machine's load.

Runs the default tier (``-m "not slow and not gpu"``, what ``make test`` runs) and the slow tier
(``-m slow``; CI runs both: ``-m "not gpu"``) as separate pytest processes, one after the other, and
records for each: wall seconds, the pytest summary (passed/skipped/failed), and the load average
sampled while it ran (on a shared machine the time means little without it). The README's test-time
figures come from here. This runs the whole suite: on a shared machine, run it once, at integration.

Usage:
    python benchmarks/bench_tests.py [--tiers default,slow] [--out benchmarks/results/tests]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from milcore.report.bench_io import machine_info, save_bench

log = logging.getLogger("bench_tests")
TIERS = {"default": "not slow and not gpu", "slow": "slow"}
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def _sample_load(samples: list[float], stop: threading.Event, period: float = 5.0) -> None:
    while not stop.is_set():
        samples.append(os.getloadavg()[0])
        stop.wait(period)


def run_tier(name: str) -> dict:
    """One tier in a fresh pytest process."""
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(samples, stop), daemon=True)
    sampler.start()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", TIERS[name]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in _SUMMARY.findall(last)}
    return {"tier": name, "marker": TIERS[name], "command": " ".join(cmd[1:]), "exit_code": proc.returncode,
            "wall_seconds": wall, "summary": last, "counts": counts,
            "load_average_min_max": [min(samples), max(samples)] if samples else []}  # fmt: skip


def format_table(result: dict) -> str:
    """Markdown table."""
    lines = ["| tier | marker | wall s | passed | skipped | failed | load average (min-max) |",
             "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in result["rows"]:
        c = r["counts"]
        lo, hi = r["load_average_min_max"] or [float("nan")] * 2
        failed = c.get("failed", 0) + c.get("error", 0)
        lines.append(f"| {r['tier']} | `{r['marker']}` | {r['wall_seconds']:.0f} | {c.get('passed', 0)} | "
                     f"{c.get('skipped', 0)} | {failed} | {lo:.1f}-{hi:.1f} |")  # fmt: skip
    lines.append(f"\n{result['machine']['cpus']} CPUs.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--tiers", default="default,slow", help="comma-separated: default, slow")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tests"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [run_tier(t) for t in args.tiers.split(",") if t]
    result = {"benchmark": "tests", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
              "rows": rows}  # fmt: skip
    save_bench(args.out, result, format_table(result))
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
