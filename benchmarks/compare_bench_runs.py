"""Two ``milcore bench aggregators`` runs of the same folds compared fit by fit (paired), with bootstrap CIs.

Each fit is keyed by (model, implementation, variant, seed, fold); only the fits present and finished in
both runs are paired, and two runs whose recorded splits of a shared seed differ are refused. For every
model and metric: the mean in A and in B, the mean paired difference B - A with a 95 % bootstrap CI
(:func:`milcore.metrics.mean_ci`: percentile, 4,000 resamples, seeded), and the number of fits whose value
is identical; then the same over all the paired fits. Also the epochs run and the process CPU seconds of
each side. Writes ``compare.json`` and ``compare.md`` into ``--out``.

Usage: ``python benchmarks/compare_bench_runs.py A/bench.json B/bench.json --out DIR [--metrics m1,m2]
[--variants tuned]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("compare_bench_runs")

METRICS = ("balanced_accuracy", "auroc", "instance_auroc")


def _key(run: dict[str, Any]) -> tuple[str, str, str, int, int]:
    return run["model"], run.get("impl", "milcore"), run.get("variant", "default"), run["seed"], run["fold"]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def paired(diffs: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean of ``diffs`` with its 95 % percentile bootstrap CI (:func:`milcore.metrics.mean_ci`); one value:
    the CI is that value."""
    from milcore.metrics import mean_ci

    ci = mean_ci(diffs, method="bootstrap", n_boot=4000, seed=seed)
    low, high = ci["ci95"] if len(diffs) > 1 else (ci["mean"], ci["mean"])
    return {"mean": ci["mean"], "low": low, "high": high, "n": ci["n"]}


def compare(a: dict[str, Any], b: dict[str, Any], metrics: tuple[str, ...] = METRICS,
            variants: tuple[str, ...] | None = None) -> dict[str, Any]:  # fmt: skip
    """Paired comparison of two bench results (see the module docstring); ``variants`` (``default``,
    ``tuned``) keeps only those fits."""

    def keep(r: dict[str, Any]) -> bool:
        return r.get("status") == "ok" and (variants is None or r.get("variant", "default") in variants)

    runs_a = {_key(r): r for r in a["runs"] if keep(r)}
    runs_b = {_key(r): r for r in b["runs"] if keep(r)}
    keys = sorted(set(runs_a) & set(runs_b))
    splits_a, splits_b = a.get("splits") or {}, b.get("splits") or {}
    differ = sorted({str(k[3]) for k in keys if str(k[3]) in splits_a and str(k[3]) in splits_b
                     and splits_a[str(k[3])] != splits_b[str(k[3])]})  # fmt: skip
    if differ:  # fold k of one run is not fold k of the other: pairing them would compare other patients
        raise ValueError(f"the two runs split the patients differently (seed {', '.join(differ)}): not the same folds")
    groups: dict[str, list[tuple]] = {}
    for k in keys:
        label = k[0] if k[1] == "milcore" else f"{k[1]} {k[0]}"
        groups.setdefault(label + ("" if k[2] == "default" else f" ({k[2]})"), []).append(k)
    rows, everything = [], {m: [] for m in metrics}
    for label, ks in groups.items():
        row: dict[str, Any] = {"model": label, "fits": len(ks),
                               "epochs_a": float(np.mean([runs_a[k]["epochs_run"] for k in ks])),
                               "epochs_b": float(np.mean([runs_b[k]["epochs_run"] for k in ks])),
                               "cpu_s_a": float(sum(runs_a[k].get("cpu_s") or 0.0 for k in ks)),
                               "cpu_s_b": float(sum(runs_b[k].get("cpu_s") or 0.0 for k in ks))}  # fmt: skip
        for m in metrics:
            pairs = [(runs_a[k].get(m), runs_b[k].get(m)) for k in ks]
            pairs = [(x, y) for x, y in pairs if _finite(x) and _finite(y)]
            if not pairs:
                continue
            va, vb = np.array(pairs).T
            diffs = vb - va
            everything[m].extend(diffs.tolist())
            row[m] = {"a": float(va.mean()), "b": float(vb.mean()), "diff": paired(diffs),
                      "identical": int(np.sum(diffs == 0))}  # fmt: skip
        rows.append(row)
    overall = {m: paired(np.array(v)) for m, v in everything.items() if v}
    return {"paired_fits": len(keys), "only_in_a": len(set(runs_a) - set(runs_b)),
            "only_in_b": len(set(runs_b) - set(runs_a)), "metrics": list(metrics), "models": rows,
            "overall": overall, "a": {"seconds": a.get("seconds"), "cpu_seconds": a.get("cpu_seconds")},
            "b": {"seconds": b.get("seconds"), "cpu_seconds": b.get("cpu_seconds")}}  # fmt: skip


def markdown(result: dict[str, Any], names: tuple[str, str]) -> str:
    """The comparison as a Markdown table (one row per model, then all paired fits)."""
    a, b = names
    metrics = [m for m in result["metrics"] if m in result["overall"]]
    head = ["model", "fits"]
    for m in metrics:
        head += [f"{m} {a}", f"{m} {b}", f"{b} − {a} [95% CI]", "identical"]
    head += [f"epochs {a}", f"epochs {b}", f"CPU s {a}", f"CPU s {b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ci(d: dict[str, float]) -> str:
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    for row in result["models"]:
        cells = [row["model"], str(row["fits"])]
        for m in metrics:
            r = row.get(m)
            cells += [f"{r['a']:.3f}", f"{r['b']:.3f}", ci(r["diff"]), f"{r['identical']}/{r['diff']['n']}"] if r \
                else ["-"] * 4  # fmt: skip
        cells += [f"{row['epochs_a']:.1f}", f"{row['epochs_b']:.1f}", f"{row['cpu_s_a']:.0f}", f"{row['cpu_s_b']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for m in metrics:
        lines.append(f"All {result['paired_fits']} paired fits, {m}: {b} − {a} = {ci(result['overall'][m])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="bench.json of run A (the reference)")
    p.add_argument("b", help="bench.json of run B")
    p.add_argument("--names", default="A,B", help="two short names for the columns (default A,B)")
    p.add_argument("--metrics", default=",".join(METRICS))
    p.add_argument("--variants", default=None, help="only these fits, e.g. tuned (default: all)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = tuple(args.names.split(","))
    if len(names) != 2:
        p.error("--names: two names separated by a comma")
    runs = []
    for path in (args.a, args.b):
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            p.error(f"{path}: not a readable bench.json ({err})")
        if "runs" not in runs[-1]:
            p.error(f"{path}: no 'runs' (not the bench.json of 'milcore bench aggregators')")
    try:
        variants = tuple(v for v in args.variants.split(",") if v) if args.variants else None
        result = compare(runs[0], runs[1], tuple(m for m in args.metrics.split(",") if m), variants)
    except ValueError as err:
        p.error(f"{args.a} vs {args.b}: {err}")
    if not result["paired_fits"]:
        p.error(f"{args.a} and {args.b} share no finished fit (same models, seeds and folds?)")
    result["inputs"] = {"a": args.a, "b": args.b, "names": list(names)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    table = markdown(result, names)  # type: ignore[arg-type]
    (out / "compare.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
