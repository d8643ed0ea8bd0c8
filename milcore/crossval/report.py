"""The training run's report: metric tables with CIs, confusion, ROC, reliability, learning curves, galleries."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from milcore.metrics import HEADLINE, TABLE, label
from milcore.report import Report, fmt, fmt_ci, plots, plural
from milcore.report.caveats import (
    add_warnings,
    chance_classes,
    class_size_warnings,
    headline_warnings,
    log_warnings,
    prediction_warnings,
    temperature_warnings,
)
from milcore.report.glossary import RUN_TERMS, UNCERTAINTY_TERMS, add_glossary
from milcore.trust.abstention_report import uncertainty_section

log = logging.getLogger(__name__)



def _temperature_cell(t: float) -> str:
    from milcore.metrics.calibration import temperature_at_bound

    bound = temperature_at_bound(t)
    return fmt(float(t)) + (f" (at {bound} bound)" if bound else "")


def run_warnings(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything that makes a cross-validated run unfit to be read as a decision (``metrics.json["warnings"]``).

    Computed from what ``metrics.json`` already holds: the pooled out-of-fold metrics and their CIs
    (chance, below chance, wide CI), the pooled confusion matrix (a single predicted class), the per-class
    support against the number of folds, and each fold's fitted temperature (at a bound of its search
    range). The rules are those of :mod:`milcore.report.caveats`.
    """
    pooled = metrics["pooled"]
    support = {c: int(v["support"]) for c, v in pooled["per_class"].items()}
    folds = metrics["per_fold"]
    return (headline_warnings(pooled["metrics"], chance_classes(list(support.values()), len(metrics["classes"])))
            + prediction_warnings(pooled["confusion_matrix"], metrics["classes"])
            + class_size_warnings(support, int(metrics["folds"]))
            + temperature_warnings([r["temperature"] for r in folds], [f"fold {r['fold']}" for r in folds]))


def write_run_report(out: Path, metrics: dict[str, Any], table, history_of: dict[int, Path],
                     crops: str | Path | None = None) -> tuple[Path, Path]:  # fmt: skip
    """Render ``report.html`` and ``report.md`` for a finished run folder."""
    classes = metrics["classes"]
    rep = Report(f"{metrics['model']} on {metrics['task']} — {metrics['folds']}-fold cross-validation")
    warnings = metrics["warnings"] if "warnings" in metrics else run_warnings(metrics)
    log_warnings(log, warnings)
    add_warnings(rep, warnings)
    mean, pooled = metrics["mean"], metrics["pooled"]["metrics"]
    rep.paragraph(
        f"{plural(len(table.bag_ids), 'patient')}, classes: {', '.join(classes)}. Each patient is predicted once, "
        f"by the fold that held it out (pooled out-of-fold); validation folds were used only for early stopping and "
        f"temperature scaling (T). Terms are explained at the end of the report."
    )
    rows = []
    for k in (*HEADLINE, *(k for k in TABLE if k not in HEADLINE)):
        if k not in mean:
            continue
        m = mean[k]
        pooled_cell = fmt_ci(pooled[k]["value"], pooled[k]["ci95"]) if k in pooled else (
            fmt(metrics["instance"]["instance_auroc"]) if k == "instance_auroc" and "instance" in metrics else "–")
        rows.append([label(k), f"{fmt(m['mean'])} ± {fmt(m['sd'])}", pooled_cell])
    rep.heading("Headline")
    rep.table(["metric", "mean ± sd over folds", "pooled out-of-fold [95% bootstrap CI]"], rows)
    if "instance" in metrics:
        inst = metrics["instance"]
        rep.paragraph(f"Attention vs the ground-truth diagnostic cells: mean per-patient AUROC "
                      f"{fmt(inst['instance_auroc'])} over {plural(inst['bags_with_ground_truth'], 'patient')} with "
                      f"both kinds of cells (pooled: {fmt(inst['instance_auroc_pooled'])}).")  # fmt: skip
    rep.heading("Per fold")
    cols = ["fold", "n test", "best epoch", "T", "balanced acc.", "macro-F1", "AUROC", "ECE"]
    has_inst = any("instance_auroc" in r for r in metrics["per_fold"])
    if has_inst:
        cols.append("inst. AUROC")
    rep.table(cols, [[r["fold"], r["n_test"], r["best_epoch"], _temperature_cell(r["temperature"]),
                      r["balanced_accuracy"], r["macro_f1"], r["auroc"], r["ece"]]
                     + ([r.get("instance_auroc", float("nan"))] if has_inst else [])
                     for r in metrics["per_fold"]])  # fmt: skip
    rep.heading("Per class (pooled)")
    rep.table(["class", "support", "recall", "F1", "AUROC"],
              [[c, v["support"], v["recall"], v["f1"], v["auroc"]] for c, v in metrics["pooled"]["per_class"].items()])
    rep.heading("Plots")
    labelled = table.labels >= 0
    rep.figure(plots.confusion_figure(np.asarray(metrics["pooled"]["confusion_matrix"]), classes),
               "Out-of-fold confusion matrix (rows: true class).")  # fmt: skip
    rep.figure(plots.roc_figure(table.labels[labelled], table.proba[labelled], classes), "One-vs-rest ROC curves.")
    rep.figure(plots.reliability_figure(metrics["pooled"]["reliability"]),
               "Reliability of the calibrated probabilities (numbers: patients per bin).")  # fmt: skip
    curves = {}
    for fold, folder in sorted(history_of.items()):
        path = folder / "history.json"
        if path.exists():
            hist = json.loads(path.read_text())
            curves[f"fold {fold}"] = [h["val_loss"] for h in hist]
    if curves:
        longest = max(len(v) for v in curves.values())
        padded = {k: v + [float("nan")] * (longest - len(v)) for k, v in curves.items()}
        rep.figure(plots.lines_figure(list(range(longest)), padded, "epoch", "validation loss",
                                      "Learning curves"), "Validation loss per epoch and fold.")  # fmt: skip
    if metrics.get("uncertainty"):
        uncertainty_section(rep, metrics["uncertainty"], len(table.bag_ids))
    from feature_cache.errors import UserError
    from milcore import explain
    from milcore.explain_cells import run_attribute_heads

    rep.heading("Cells that drove the decisions")
    try:  # with the attributes of the top cells once the run has attribute heads (milcore explain --attributes)
        ex_rep, _ = explain.build_explanations(out, crops, top_k=8, max_patients=6, attributes=run_attribute_heads(out))
    except UserError as exc:  # an input the galleries need is missing or unreadable; a drawing bug is raised
        log.warning("cell galleries not drawn: %s", exc)
        rep.paragraph(f"Cell galleries not drawn: {exc}", css="note")
    else:
        rep.blocks.extend(ex_rep.blocks)
    add_glossary(rep, [*RUN_TERMS, *(["instance-AUROC"] if "instance" in metrics else []),
                       *(UNCERTAINTY_TERMS if metrics.get("uncertainty") else ())])  # fmt: skip
    html, md = rep.write(out, "report")
    return html, md


def refresh_run_report(run: str | Path) -> tuple[Path, Path]:
    """Render a finished run's ``report.html`` / ``report.md`` again from its files (``metrics.json``,
    ``predictions.csv``, fold histories), e.g. once ``milcore explain --attributes`` gave it attribute heads."""
    from milcore.data.predictions import read_predictions

    run = Path(run)
    metrics = json.loads((run / "metrics.json").read_text())
    folds = {int(p.name.split("_", 1)[1]): p for p in run.glob("fold_*") if p.name.split("_", 1)[1].isdigit()}
    return write_run_report(run, metrics, read_predictions(run), history_of=folds)
