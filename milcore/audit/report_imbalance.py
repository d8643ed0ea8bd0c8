"""Report of the imbalance experiments: imbalance curves, trend tests, age-exclusion effects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from milcore.metrics import label as metric_label
from milcore.report import Report, fmt_ci, plots, plural
from milcore.report.caveats import add_warnings, headline_warnings
from milcore.report.glossary import EXPERIMENT_TERMS, add_glossary


def _f(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _p(x: Any) -> str:
    if x is None or x != x:  # missing or NaN
        return "–"
    return f"{x:.2g}" if x >= 0.001 else "<0.001"


def _significant(effect: dict[str, Any], alpha: float) -> str:
    if effect.get("status") == "insufficient":
        return "insufficient"
    p = effect.get("p_value")
    return "yes" if p is not None and p == p and p < alpha else ""


def experiment_warnings(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Chance and precision warnings for an imbalance experiment (``audit.json["warnings"]``).

    The experiment has no bootstrap over patients, so the rule of :mod:`milcore.report.caveats` is
    applied to the mean test balanced accuracy and AUROC on all test patients over every training
    (conditions x seeds) with its 95% t-interval; that interval reflects re-training noise on one fixed
    test set, so a model near chance may still escape it on a tiny test set (the design paragraph gives
    the test size). When the model is at chance, imbalance effects on it are not meaningful.
    """
    from milcore.metrics import CHANCE_METRICS, mean_ci

    values: dict[str, dict[str, Any]] = {}
    for metric in CHANCE_METRICS:
        v = [_f(r["test"]["all"].get(metric)) for r in result["runs"] if "all" in r.get("test", {})]
        if v:
            m = mean_ci(v)
            values[metric] = {"value": m["mean"], "ci95": m["ci95"]}
    out = headline_warnings(values, len(result.get("classes") or []) or 2,
                            subject="The model, averaged over every training of the experiment,")  # fmt: skip
    for w in out:
        if w["code"] in ("chance", "below_chance"):
            w["message"] += (" Effects of sex or age imbalance on a chance-level model are not meaningful: "
                             "no effect found is not evidence that imbalance does no harm.")  # fmt: skip
    return [w for w in out if w["code"] != "wide_ci"]  # the interval is over trainings, not a precision claim


def add_experiment_sections(rep: Report, result: dict[str, Any]) -> None:
    """Append the experiment's warnings, design, curves and effect tables to ``rep``."""
    spec, design, analysis = result["spec"], result["design"], result["analysis"]
    add_warnings(rep, result["warnings"] if "warnings" in result else experiment_warnings(result))
    alpha = result["config"]["alpha"]
    rep.heading("Design")
    rep.paragraph(
        f"{plural(design['patients'], 'patient')}; a fixed test set of {plural(design['test']['all'], 'patient')} "
        f"({design['test'].get('sex=F', 0)} female, {design['test'].get('sex=M', 0)} male) was held out once. "
        f"{spec['train']['model']} was re-trained {plural(len(result['runs']), 'time')} "
        f"({plural(spec['seeds'], 'seed')} per condition): with "
        f"{plural(design['sex_train_size'], 'training patient')} at female fractions "
        f"{', '.join(f'{f:g}' for f in spec['fractions'])}"
        + (f", and with {plural(design['age_train_size'], 'training patient')} excluding each age band in turn "
           f"({', '.join(design['age_bands_excluded'])}) against a baseline that excludes none"
           if design["age_bands_excluded"] else "") + ". Each training set keeps a validation share for early "
        f"stopping and temperature scaling; {result['seconds']:.0f} s in all.")  # fmt: skip
    if result["notes"]:
        rep.bullets(result["notes"])
    sex = analysis.get("sex") or {}
    if sex:
        rep.heading("Sex imbalance")
        trends = sex["trends"]
        rows = []
        for key, t in trends.items():
            group, metric = key.split(":")
            rows.append(
                [
                    group,
                    metric_label(metric),
                    fmt_ci(_f(t["slope"]), [_f(c) for c in t["ci95"]]),
                    _p(t["p_value"]),
                    "yes" if t["p_value"] is not None and t["p_value"] < alpha else "",
                ]
            )
        rep.table(["test group", "metric", "slope per unit female fraction [95% CI]", "p (trend)", "significant"],
                  rows, caption="OLS trend of each test metric over all runs against the training set's female "
                  "fraction (a slope of 0.1 = 10 points from all-male to all-female).")  # fmt: skip
        curves = sex["curves"]
        for metric in ("balanced_accuracy", "auroc"):
            series, bands = {}, {}
            for group, label in (("sex=F", "female test patients"), ("sex=M", "male test patients"),
                                 ("all", "all test patients")):  # fmt: skip
                pts = curves.get(f"{group}:{metric}")
                if not pts:
                    continue
                series[label] = [_f(p["mean"]) for p in pts]
                bands[label] = tuple(np.clip([_f(p["ci95"][k]) for p in pts], 0.0, 1.0) for k in (0, 1))  # in [0, 1]
            xs = [p["female_fraction"] for p in curves[f"all:{metric}"]]
            rep.figure(plots.lines_figure(xs, series, "female fraction of the training set", metric_label(metric),
                                          f"{metric_label(metric)} vs training sex balance", bands),
                       "Mean over seeds with 95% t-intervals (shaded, clipped to [0, 1]) on the fixed test set.",
                       name=f"imbalance_{metric}")  # fmt: skip
        rep.table(["female fraction", "female BA", "male BA", "all BA"],
                  [[f"{p['female_fraction']:g}", fmt_ci(_f(p["mean"]), [_f(c) for c in p["ci95"]]),
                    fmt_ci(_f(m["mean"]), [_f(c) for c in m["ci95"]]),
                    fmt_ci(_f(a["mean"]), [_f(c) for c in a["ci95"]])]
                   for p, m, a in zip(curves["sex=F:balanced_accuracy"], curves["sex=M:balanced_accuracy"],
                                      curves["all:balanced_accuracy"], strict=True)],
                  caption="Balanced accuracy on the fixed test set, mean [95% t-interval] over seeds.")  # fmt: skip
    age = analysis.get("age") or {}
    if age.get("effects"):
        rep.heading("Age bands left out")
        effects = [e for e in age["effects"] if e["metric"] == "balanced_accuracy"]
        rep.table(["excluded band", "test group", "n test", "effect on BA [95% CI]", "p (paired t)", "significant"],
                  [[e["excluded"], e["test_group"], e["n_test"], fmt_ci(_f(e["mean"]), [_f(c) for c in e["ci95"]]),
                    _p(e.get("p_value")), _significant(e, alpha)] for e in effects],
                  caption="Balanced accuracy with the band excluded minus the baseline (nothing excluded), paired by "
                          "seed; negative = the exclusion hurts that test group.")  # fmt: skip
        own = [e for e in effects if e["test_group"] == f"age={e['excluded']}" and e["mean"] is not None]
        if own:
            hurt = [_significant(e, alpha) == "yes" and e["mean"] < 0 for e in own]
            rep.figure(plots.forest_figure([f"{e['excluded']} (n test={e['n_test']})" for e in own],
                                           [_f(e["mean"]) for e in own], [_f(e["ci95"][0]) for e in own],
                                           [_f(e["ci95"][1]) for e in own], reference=0.0, flagged=hurt,
                                           xlabel="change in balanced accuracy",
                                           title="Effect of leaving an age band out"),
                       "Change in the excluded band's own test balanced accuracy (95% t-interval over seeds).",
                       name="age_exclusion")  # fmt: skip


def write_experiment_report(out: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """Render ``audit.html`` and ``audit.md`` for an imbalance experiment."""
    from milcore.report.files import write_report_atomic

    rep = Report(f"Imbalance experiments: {result['spec']['train']['model']} on {result['spec']['task']}")
    add_experiment_sections(rep, result)
    rep.paragraph(f"Run table: every training's test metrics are in audit.json ({plural(len(result['runs']), 'run')}).",
                  css="muted")  # fmt: skip
    add_glossary(rep, EXPERIMENT_TERMS)
    return write_report_atomic(Path(out), rep, "audit")
