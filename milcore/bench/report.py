"""The aggregator benchmark's outputs: ``bench.json``, ``table.md`` and a report (HTML + Markdown) with plots."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from milcore.metrics import CHANCE_METRICS, HEADLINE, label
from milcore.report.document import plural

log = logging.getLogger(__name__)

#: Metric columns of the tables, in this order where a run has them (labels from the metric table).
COLUMNS = tuple((k, label(k, short=True)) for k in (*HEADLINE, "instance_auroc", *(f"ood_{m}" for m in CHANCE_METRICS)))


def _pm(metric: dict[str, Any] | None, digits: int = 3) -> str:
    if metric is None or not math.isfinite(metric["mean"]):
        return "-"
    return f"{metric['mean']:.{digits}f} ± {metric['sd']:.{digits}f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def model_label(row: dict[str, Any]) -> str:
    """``abmil`` for our models, ``torchmil abmil`` for a peer, ``... (tuned)`` for a tuned row (a summary row
    or a run row)."""
    name = row["model"] if row["impl"] == "milcore" else f"torchmil {row['model']}"
    return name + (" (tuned)" if row.get("variant") == "tuned" else "")


def _at_chance(result: dict[str, Any], row: dict[str, Any]) -> bool:
    from milcore.report.caveats import CHANCE_CODES

    return any(w["code"] in CHANCE_CODES and w.get("scope") != "ood" and w.get("model") == row["model"]
               and w.get("impl") == row["impl"] and w.get("variant", "default") == row.get("variant", "default")
               for w in result.get("warnings", []))  # fmt: skip


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the summary table (mean ± sd over folds x seeds)."""
    summary = result["summary"]
    shown = [(k, h) for k, h in COLUMNS if any(k in s.get("metrics", {}) for s in summary)]
    headers = ["model", *[h for _, h in shown], "train bags/s", "infer ms/bag", "peak MB", "params", "runs"]
    rows = []
    for s in summary:
        if s.get("status") == "failed":
            rows.append([model_label(s), f"FAILED ({s['failed_runs']} of {s['runs']} runs)",
                         *["-"] * (len(shown) - 1), "-", "-", "-", "-", str(s["runs"] - s["failed_runs"])])  # fmt: skip
            continue
        if "metrics" not in s:
            rows.append([model_label(s), *[s["status"]] * len(shown), "-", "-", "-", "-", "0"])
            continue
        m = s["metrics"]
        label = model_label(s) + (" (at chance)" if _at_chance(result, s) else "")
        rows.append([label, *[_pm(m.get(k)) for k, _ in shown], _num(m["train_bags_per_s"]["mean"]),
                     _num(m["infer_ms_per_bag"]["mean"], 2), _num(s["peak_mb_max"]), f"{s['params']:,}",
                     str(s["runs"])])  # fmt: skip
    return headers, rows


def markdown_table(result: dict[str, Any]) -> str:
    """The summary table in Markdown, followed by the peer comparison lines."""
    headers, rows = table_rows(result)
    lines = [f"**{result['partial']['message']}**", ""] if result.get("partial") else []
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    failures = failure_lines(result)
    if failures:
        lines += ["", *failures]
    if result.get("rare_witness"):
        lines += ["", *rare_witness_lines(result)]
    if result.get("tuning"):
        lines += ["", tuning_budget_line(result), ""]
        headers, rows = tuning_rows(result)
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *peer_lines(result), "", run_line(result)]
    part = part_line(result)
    if part:
        lines += ["", part]
    return "\n".join(lines).rstrip() + "\n"


def part_line(result: dict[str, Any]) -> str:
    """What a part of a job array holds (``--fold K``), or which parts a merged benchmark joins; else ``""``."""
    spec = result["spec"]
    if spec.get("fold") is not None:
        k = spec["folds"]
        return (f"Part of a job array: fold {spec['fold']} of {k} (--fold {spec['fold']}; folds 0 to {k - 1}) of "
                f"{_seeds(spec['seeds'])}; the means above are over this fold only. Join the parts with milcore report "
                "merge PART ... --out BENCH.")  # fmt: skip
    if result.get("parts"):
        return (f"Merged from {plural(len(result['parts']), 'part')} (milcore report merge): "
                + "; ".join(f"{p['folder']} ({_seeds(p['seeds'])}, "
                            + ("every fold" if p.get("fold") is None else f"fold {p['fold']}") + ")"
                            for p in result["parts"]) + ".")  # fmt: skip
    return ""


def rare_witness_lines(result: dict[str, Any]) -> list[str]:
    """The rare-witness table (test-split bags): bag AUROC and attention instance-AUROC with CIs, gap, vs ABMIL."""

    def ci(entry: dict[str, Any] | None) -> str:
        if not entry or entry.get("mean", entry.get("difference")) is None:
            return "n/a"
        value = entry.get("mean", entry.get("difference"))
        bounds = entry.get("ci95")
        sign = "+" if "difference" in entry else ""
        text = f"{value:{sign}.3f}"
        return text + (f" [{bounds[0]:{sign}.3f}, {bounds[1]:{sign}.3f}]" if bounds else "")

    rw, case = result["rare_witness"], result.get("case", {})
    lo, hi = case.get("witnesses", ["?", "?"])
    lines = [f"Rare witnesses: test-split bags ({case.get('test_bags', '?')} bags of {case.get('bag_range', ['?'])[0]}-"
             f"{case.get('bag_range', ['?', '?'])[-1]} cells, {lo}-{hi} {case.get('witness', 'witness')} cells in a "
             f"positive bag), models trained on {case.get('train_bags', '?')} train-split bags; mean over folds x "
             "seeds [bootstrap 95% CI]", "",
             "| model | bag AUROC | attention inst. AUROC | inst. - bag | bag AUROC - abmil (paired) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for m in rw["models"]:
        gap = "n/a" if m["gap"] is None else f"{m['gap']:+.3f}"
        lines.append(f"| {model_label(m)} | {ci(m['bag_auroc'])} | {ci(m['instance_auroc'])} | {gap} | "
                     f"{ci(m.get('vs_abmil'))} |")  # fmt: skip
    t = rw.get("targets", {})
    if t:
        within, above = t.get("bag_within_0.05_of_instance"), t.get("at_least_0.05_above_abmil")
        parts = [f"best bag AUROC: {t['best_model']}"]
        if within:
            parts.append(f"its instance - bag gap {within['gap']:+.3f} ({'met' if within['met'] else 'NOT met'}: "
                         "|gap| <= 0.05)")  # fmt: skip
        if above:
            parts.append(f"{above['difference']:+.3f} above abmil ({'met' if above['met'] else 'NOT met'}: >= +0.05)")
        lines += ["", "Targets: " + "; ".join(parts)]
    return lines


def failure_lines(result: dict[str, Any]) -> list[str]:
    """One line per failed run: which model, seed and fold, and the error."""
    folds = result["spec"]["folds"]
    return [f"- FAILED: {model_label(s)} seed {f['seed']} fold {f['fold'] + 1}/{folds}: {f['error']}"
            for s in result["summary"] if s.get("status") == "failed" for f in s["failures"]]  # fmt: skip


def _se_rule(budget: dict[str, Any]) -> str:
    """The standard-error part of the rule for replacing the defaults ('' where off or not recorded)."""
    k = budget.get("min_gain_se", 0)
    return (f" and by at least {k:g} standard error{'s' if k != 1 else ''} of that gain, paired bootstrap of the "
            f"inner patients") if k else ""  # fmt: skip


def _confirm_rule(budget: dict[str, Any]) -> str:
    """The confirmation part of the rule for replacing the defaults ('' where off or not recorded)."""
    return (", and again when it and the defaults are retrained on fresh inner folds (another split and seed)"
            if budget.get("confirm") else "")  # fmt: skip


def tuning_budget_line(result: dict[str, Any]) -> str:
    """The tuning budget every model got, in one sentence."""
    b = result["tuning"]["budget"]
    shared = ", ".join(f"{k} {v}" for k, v in b["shared"].items())
    return (f"Tuning budget, the same for every model: {b['trials']} Optuna trials per outer fold ({b['sampler']}; "
            f"pruner: {b['pruner']}), each trial a {b['inner_folds']}-fold patient-level CV inside the outer fold's "
            f"training + validation bags (its test bags never seen), maximising the pooled inner out-of-fold "
            f"{label(b['metric'])} (a trial replaces the defaults only when it beats them by at least "
            f"{b.get('min_gain', 0):g}{_se_rule(b)}{_confirm_rule(b)}); at most "
            f"{b['max_fits_per_model_and_fold']} fits per model and outer fold. "
            f"Shared dimensions: {shared} (dropout where the model has one); each aggregator adds its declared "
            f"space (bench.json tuning.budget.spaces).")  # fmt: skip


def tuning_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Default vs tuned per model: means over the paired (seed, fold) runs, the difference and its 95% CI."""
    comp = result["tuning"]["comparison"]
    metrics = [m for m in ("balanced_accuracy", "auroc") if any(m in c for c in comp.values())]
    headers = ["model"]
    for m in metrics:
        short = label(m, short=True)
        headers += [f"{short} default", f"{short} tuned", f"{short} tuned - default [95% CI]"]
    headers += ["kept defaults", "tuned below default"]
    rows = []
    for c in comp.values():
        row = [model_label({"impl": c["impl"], "model": c["model"]})]
        below = []
        for m in metrics:
            e = c[m]
            lo, hi = e["difference_ci95"]
            ci = f"[{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) else "[n/a]"
            row += [f"{e['default']:.3f}", f"{e['tuned']:.3f}", f"{e['difference']:+.3f} {ci}"]
            if e["below"]:
                below.append(label(m, short=True))
        row += [f"{c['kept_defaults']} of {c['pairs']}", ", ".join(below) or "no"]
        rows.append(row)
    return headers, rows


def _seeds(seeds: list[int]) -> str:
    """``seed 0`` or ``seeds 0, 1, 2``."""
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def run_line(result: dict[str, Any]) -> str:
    """Wall and process CPU time of the whole benchmark, threads and the machine's load (for a merged benchmark:
    summed over its jobs, with each job's load)."""
    if result.get("parts"):
        loads = [f"{p['load_average_before'][0]:.1f}-{p['load_average_after'][0]:.1f}"
                 if p.get("load_average_before") and p.get("load_average_after") else "nan"
                 for p in result["parts"]]  # fmt: skip
        return (f"Run: {plural(len(result['parts']), 'job')} (parts of a job array): {result['seconds']:.0f} s wall "
                f"and {result.get('cpu_seconds') or 0:.0f} s CPU summed over them (they may have run at the same time, "
                f"on other machines); load average (1 min) per job at start-end: {', '.join(loads)}")  # fmt: skip
    load = result.get("load_average_after") or []
    before = result.get("machine", {}).get("load_average") or []
    cpu = result.get("cpu_seconds")
    start = f"{before[0]:.1f}" if before else "nan"
    end = f"{load[0]:.1f}" if load else "nan"
    workers = result.get("workers", 1)
    how = f"{plural(workers, 'worker process', 'worker processes')} x 1 torch thread" if workers > 1 else (
        plural(result["torch_threads"], "torch thread"))
    precision = f", {result['precision']}" if result.get("precision") else ""
    return (f"Run: {result['seconds']:.0f} s wall" + (f", {cpu:.0f} s CPU (all processes)" if cpu is not None else "")
            + f", {how}{precision}, {result['machine'].get('cpus', '?')} CPUs; "
            f"load average (1 min) {start} at start, {end} at end")  # fmt: skip


def peer_lines(result: dict[str, Any]) -> list[str]:
    """One line per model run by both libraries: accuracy difference with its CI and the speed ratio."""
    out = []
    for name, c in result.get("peers", {}).items():
        lo, hi = c["difference_ci95"]
        verdict = {True: "within CI", False: "differs", None: "n/a"}[c["match"]]
        out.append(f"- {name}: ours - torchmil {c['metric'].replace('_', ' ')} {c['difference_mean']:+.3f} "
                   f"[95% CI {lo:+.3f}, {hi:+.3f}] over {plural(c['pairs'], 'paired run')} ({verdict}); training "
                   f"{c['train_bags_per_s_ours']:,.0f} vs {c['train_bags_per_s_theirs']:,.0f} bags/s = "
                   f"{c['speed_ratio']:.2f}x")  # fmt: skip
    if result.get("torchmil") == "not installed":
        out.append("- torchmil: not installed (pip install 'milcore[peers]'); its rows are left out")
    return out


def write_outputs(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``table.md`` and ``report.html``/``report.md`` (with plots) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    paths = {"json": out / "bench.json", "table": out / "table.md"}
    _atomic_write(paths["json"], json.dumps(result, indent=2, default=_json_default, allow_nan=True))
    _atomic_write(paths["table"], table)
    html, md = build_report(result).write(out, "report")
    paths.update({"html": html, "markdown": md})
    return paths


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_report(result: dict[str, Any]):
    """A :class:`milcore.report.Report`: settings, the table, peer comparison and accuracy-vs-cost plots."""
    from milcore.report.caveats import add_warnings
    from milcore.report.document import Report
    from milcore.report.glossary import BENCH_TERMS, add_glossary
    from milcore.report.plots import scatter_figure

    spec = result["spec"]
    rep = Report(f"Aggregator benchmark: {spec['task']}" + (" (PARTIAL)" if result.get("partial") else ""))
    add_warnings(rep, result.get("warnings", []))
    rep.paragraph(f"Bank {spec['bank']} ({result['encoder'].get('name', '?')}, {result['encoder'].get('dim', '?')}-d), "
                  f"cohort {spec['cohort']}: {plural(result['bags'], 'bag')}, classes {', '.join(result['classes'])}. "
                  f"{spec['folds']}-fold patient-level CV x seeds {spec['seeds']}: the same splits for every model; "
                  f"mean ± sd over folds and seeds. torchmil: {result['torchmil']}."
                  + (f" Out of distribution: site {spec['ood_site']} ({plural(result['ood_bags'], 'bag')}) held out."
                     if spec.get("ood_site") is not None else ""))  # fmt: skip
    part = part_line(result)
    if part:
        rep.paragraph(part)
    headers, rows = table_rows(result)
    rep.heading("Accuracy and cost")
    rep.table(headers, rows, caption="train bags/s: bags per second of optimisation (validation passes excluded); "
                                     "peak MB: peak memory growth of one fit (largest over runs)")  # fmt: skip
    failures = failure_lines(result)
    if failures:
        rep.heading("Failed runs")
        rep.bullets([f.removeprefix("- ") for f in failures])
    if result.get("tuning"):
        rep.heading("Tuned vs default (nested CV, equal budgets)")
        rep.paragraph(tuning_budget_line(result))
        headers, rows = tuning_rows(result)
        rep.table(headers, rows, caption="paired over the same seeds and outer folds; 'kept defaults': outer folds "
                                         "where no trial beat the model's defaults in the inner CV")  # fmt: skip
    if result.get("peers"):
        rep.heading("Ours vs torchmil (same bags, splits, loop and budget)")
        rep.bullets([p.removeprefix("- ") for p in peer_lines(result)])
    done = [s for s in result["summary"] if "metrics" in s]
    if done:
        costs = (("train_bags_per_s", "training bags/s (log)"), ("infer_ms_per_bag", "inference ms/bag (log)"))
        for cost, xlabel in costs:
            points = {model_label(s): (s["metrics"][cost]["mean"], s["metrics"]["balanced_accuracy"]["mean"])
                      for s in done if s["metrics"][cost]["mean"] > 0}  # fmt: skip
            if points:
                rep.figure(scatter_figure(points, xlabel, "balanced accuracy", "Accuracy vs cost", logx=True),
                           caption=f"balanced accuracy vs {xlabel}", name=f"accuracy_vs_{cost}")  # fmt: skip
    rep.heading("Machine")
    if result.get("parts"):
        rep.paragraph(run_line(result))
        rep.bullets([f"{p['folder']}: {json.dumps(p.get('machine'))}; torch threads {p.get('torch_threads')}; "
                     f"{p.get('seconds') or 0:.0f} s wall, {p.get('cpu_seconds') or 0:.0f} s CPU"
                     for p in result["parts"]])  # fmt: skip
    else:
        rep.paragraph(json.dumps(result["machine"]) + f"; torch threads {result['torch_threads']}; "
                      f"{result['seconds']:.0f} s in all")  # fmt: skip
    add_glossary(rep, BENCH_TERMS)
    return rep
