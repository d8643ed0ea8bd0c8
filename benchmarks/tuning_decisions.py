"""What the tuning decided in each outer fold of a ``milcore bench aggregators --tune N`` run, and what it bought.

For every tuned fit of ``bench.json``: whether the search kept the model's defaults, the inner-CV score of
the defaults, the best trial's inner-CV gain over them with its paired-bootstrap standard error and the gain
it needed (recorded since the tuning's standard-error rule; ``null`` in older runs), the gain again on fresh
inner folds where the winner was confirmed (``--tune-confirm``; ``null`` where it did not run), and the outer
test metrics of the default and of the tuned fit of the same fold. The summary counts, over all models, the folds
where a trial replaced the defaults and how often the outer metric then rose or fell, and the mean outer
change over the replaced folds, so the cost of a noisy inner choice is visible beside its gains.

Writes ``decisions.json`` and ``decisions.md`` into ``--out``.

Usage: ``python benchmarks/tuning_decisions.py RUN/bench.json --out DIR [--metrics auroc,balanced_accuracy]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("tuning_decisions")

METRICS = ("auroc", "balanced_accuracy")


def _f(value: Any, digits: int = 3, sign: bool = False) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def decisions(result: dict[str, Any], metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """Per tuned fit: the search's decision and the outer metrics beside the default fit of the same fold.

    Raises:
        ValueError: the run has no tuned fit (it was not run with ``--tune N``).
    """
    ok = [r for r in result["runs"] if r.get("status", "ok") == "ok"]
    default = {(r["model"], r.get("impl", "milcore"), r["seed"], r["fold"]): r for r in ok
               if r.get("variant", "default") == "default"}  # fmt: skip
    rows = []
    for r in ok:
        if r.get("variant") != "tuned":
            continue
        key = (r["model"], r.get("impl", "milcore"), r["seed"], r["fold"])
        if key not in default:
            continue
        t = r.get("tuning") or {}
        row = {"model": r["model"] if key[1] == "milcore" else f"{key[1]} {r['model']}", "seed": r["seed"],
               "fold": r["fold"], "kept_defaults": bool(t.get("chose_default")),
               "inner_default": t.get("default_value"), "best_gain": t.get("best_gain"),
               "best_gain_se": t.get("best_gain_se"), "gain_needed": t.get("gain_needed"),
               "confirmed": t.get("confirmed"), "confirm_gain": t.get("confirm_gain"),
               "confirm_gain_se": t.get("confirm_gain_se")}  # fmt: skip
        for m in metrics:
            row[f"{m}_default"], row[f"{m}_tuned"] = default[key].get(m), r.get(m)
        rows.append(row)
    if not rows:
        raise ValueError("no tuned fit in this run (was it run with --tune N?)")
    summary: dict[str, Any] = {"fits": len(rows), "replaced": sum(not r["kept_defaults"] for r in rows),
                               "confirmations": sum(r["confirmed"] is not None for r in rows),
                               "confirmed": sum(r["confirmed"] is True for r in rows)}  # fmt: skip
    for m in metrics:
        changes = [r[f"{m}_tuned"] - r[f"{m}_default"] for r in rows if not r["kept_defaults"]
                   and all(isinstance(r[f"{m}_{v}"], int | float) for v in ("default", "tuned"))]  # fmt: skip
        summary[m] = {"replaced_up": sum(c > 0 for c in changes), "replaced_down": sum(c < 0 for c in changes),
                      "replaced_equal": sum(c == 0 for c in changes),
                      "replaced_mean_change": sum(changes) / len(changes) if changes else None}  # fmt: skip
    return {"rows": rows, "summary": summary, "metrics": list(metrics),
            "tuning": (result.get("tuning") or {}).get("budget")}  # fmt: skip


def to_markdown(out: dict[str, Any]) -> str:
    """The decisions as a Markdown table and a summary line per metric."""
    metrics = out["metrics"]
    head = ["model", "seed", "fold", "kept defaults", "inner default", "best gain ± s.e.", "needed",
            "fresh-fold gain ± s.e."]
    for m in metrics:
        head += [f"{m} default", f"{m} tuned"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in out["rows"]:
        gain = "–" if r["best_gain"] is None else f"{_f(r['best_gain'], sign=True)} ± {_f(r['best_gain_se'])}"
        fresh = ("–" if r.get("confirm_gain") is None
                 else f"{_f(r['confirm_gain'], sign=True)} ± {_f(r['confirm_gain_se'])}")  # fmt: skip
        cells = [r["model"], str(r["seed"]), str(r["fold"]), "yes" if r["kept_defaults"] else "no",
                 _f(r["inner_default"]), gain, _f(r["gain_needed"]), fresh]  # fmt: skip
        for m in metrics:
            cells += [_f(r[f"{m}_default"]), _f(r[f"{m}_tuned"])]
        lines.append("| " + " | ".join(cells) + " |")
    s = out["summary"]
    lines += ["", f"{s['replaced']} of {s['fits']} tuned fits replaced the defaults."]
    if s.get("confirmations"):
        lines.append(f"- {s['confirmations']} winners were retrained on fresh inner folds; "
                     f"{s['confirmed']} held there.")
    for m in metrics:
        e = s[m]
        lines.append(f"- {m} in the replaced folds: up in {e['replaced_up']}, down in {e['replaced_down']}, equal in "
                     f"{e['replaced_equal']}; mean change {_f(e['replaced_mean_change'], sign=True)}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", type=Path, help="bench.json of a --tune run")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", default=",".join(METRICS), help="outer metrics to show (comma-separated)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = json.loads(args.bench.read_text())
        out = decisions(result, tuple(m for m in args.metrics.split(",") if m))
    except (OSError, ValueError, KeyError) as err:
        log.error("%s: %s", args.bench, err)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decisions.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out / "decisions.md").write_text(to_markdown(out))
    log.info("%s", to_markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
