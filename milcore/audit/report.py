"""The audit's human-readable report: summary, group tables, forest plots, a recall heatmap, imbalance curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from milcore.audit.stratified import format_gap
from milcore.metrics import label
from milcore.report import Report, fmt_ci, plots, plural
from milcore.report.caveats import add_warnings
from milcore.report.glossary import AUDIT_TERMS, add_glossary

#: Correction names as the glossary spells them.
_CORRECTIONS = {"holm": "Holm", "bonferroni": "Bonferroni", "bh": "BH", "westfall-young": "Westfall-Young"}


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "–"
    ci = entry.get("ci95")
    return fmt_ci(_nan(entry.get("value")), [_nan(c) for c in ci] if ci else None)


def _p(x: Any) -> str:
    if x is None or x != x:  # missing or NaN
        return "–"
    return f"{x:.2g}" if x >= 0.001 else "<0.001"


def primary_metrics(config: dict[str, Any]) -> list[str]:
    """The primary family's metrics of an audit's config (``primary_metric`` in audits written before round 3)."""
    return list(config.get("primary_metrics") or [config["primary_metric"]])


def add_audit_sections(rep: Report, audit: dict[str, Any]) -> None:
    """Append the stratified audit's sections (warnings, summary, tables, figures, terms) to ``rep``."""
    summary, config = audit["summary"], audit["config"]
    add_warnings(rep, audit.get("warnings", []))
    rep.heading("Summary")
    rep.paragraph(summary["headline"], css="note" if summary["flagged_groups"] or summary.get("at_chance") else "")
    if summary["details"]:
        rep.bullets(summary["details"])
    fam = audit["families"]
    one_sided = config.get("alternative", "two-sided") == "worse"
    within = config.get("permute_within_class", False)
    rep.paragraph(
        f"How to read this: every group is compared with the other patients whose value is known (gap = group - "
        f"rest). Gaps are tested by permutation ({config['n_perm']} at most"
        + (", group membership shuffled within each true class, so the class mix of the groups plays no part"
           if within else "") + "; "
        + ("one-sided: is the group worse than the rest?" if one_sided else "two-sided") + ") and corrected "
        + _how_corrected(config) + f" within two families at alpha {config['alpha']}: the primary family "
        f"({' and '.join(label(m) for m in primary_metrics(config))} of single-attribute groups"
        + (f" of {', '.join(config['primary_attributes'])}" if config.get("primary_attributes") else "") + ", "
        f"{plural(fam['primary']['tests'], 'test')}) and the secondary family (other metrics, per-class recall and "
        f"FPR, intersections, parity differences: {plural(fam['secondary']['tests'], 'test')}). Intervals are 95% "
        f"percentile bootstrap CIs ({config['n_boot']} resamples, patients resampled within groups). Groups with "
        f"fewer than {config['min_group_size']} patients are marked insufficient and not tested"
        + (f"; {plural(len(audit['empty_groups']), 'empty group')} (no patient) "
           f"{'is' if len(audit['empty_groups']) == 1 else 'are'} left out" if audit.get("empty_groups") else "")
        + ". A group that is not flagged is not shown to be fair: beside every such verdict stands its minimum "
        f"detectable effect (MDE), the gap its test would find {config.get('mde_power', 0.8):.0%} of the time; "
        "smaller gaps could go unseen. Terms are explained at the end."
    )
    _detectable_gaps(rep, audit)
    if audit.get("notes"):
        rep.heading("Input")
        rep.bullets(audit["notes"])
    inp = audit["input"]
    rep.paragraph(f"{plural(inp['patients'], 'labelled patient')} from {inp['predictions']} joined with "
                  f"{inp['cohort']}" + (f"; {plural(inp['not_in_cohort'], 'predicted bag')} missing from the cohort "
                                        "table left out"
                     if inp["not_in_cohort"] else "") + ".")  # fmt: skip
    metrics = list(dict.fromkeys([*primary_metrics(config), *config["test_metrics"]]))
    rep.heading("Per group")
    overall = audit["overall"]
    rows = [["overall", overall["n"], "", *[_cell(overall["metrics"].get(m)) for m in metrics]]]
    groups = [g for g in audit["groups"] if g["n"] > 0]  # an empty intersection has nothing to show
    for g in groups:
        rows.append([g["name"], g["n"], g["status"], *[_cell(g["metrics"].get(m)) for m in metrics]])
    rep.table(["group", "n", "status", *[label(m) for m in metrics]], rows,
              caption="Value [95% bootstrap CI]; CIs only for groups large enough to test.")  # fmt: skip
    comps = audit["comparisons"]
    shown = [c for c in comps if c["n_group"] > 0 and (c["family"] == "primary" or c["flagged"]
             or (c["metric"] in metrics and c["level"] == "attribute"))]  # fmt: skip
    rep.heading("Gaps and tests")
    rep.table(["group", "metric", "family", "n", "value", "rest", "gap [95% CI]", "ratio", "gap vs overall",
               "gap vs best", "p", "corrected p", "flagged"],
              [[c["group"], c["metric"], c["family"], c["n_group"], _nan(c["value"]), _nan(c["rest"]),
                fmt_ci(_nan(c["gap"]), [_nan(v) for v in c["gap_ci95"]]), _nan(c["ratio"]),
                fmt_ci(_nan(c["gap_vs_overall"]), [_nan(v) for v in c["gap_vs_overall_ci95"]]),
                _nan(c["gap_vs_best"]), _p(c["p_value"]), _p(c["p_corrected"]), _verdict(c)]
               for c in shown],
              caption="Single-attribute groups on the headline metrics, and every flagged comparison; audit.json "
                      "holds all of them (per-class recall and FPR, intersections). p: "
                      + ("one-sided, the group worse than the rest" if one_sided else "two-sided")
                      + "; 'no (MDE x)': not flagged, and a gap smaller than x could go unseen; 'not tested': why "
                        "under Skipped tests.")  # fmt: skip
    if audit["parity"]:
        rep.heading("Parity differences")
        rep.table(["attribute", "metric", "value [95% CI]", "p", "corrected p", "flagged"],
                  [[p["attribute"], label(p["metric"]), _cell(p), _p(p["p_value"]),
                    _p(p["p_corrected"]), _verdict(p)] for p in audit["parity"]],
                  caption="Largest between-group range of TPR or FPR (equalized odds) and of the rate of predicting "
                          "each class (demographic parity), over classes (one vs rest); 'no (MDE x)': a difference "
                          f"of x would be flagged {config.get('mde_power', 0.8):.0%} of the time.")  # fmt: skip
    rep.heading("Plots")
    tested = [g for g in groups if g["status"] == "ok"]
    for m in metrics:
        flags = {c["group"] for c in comps if c["metric"] == m and c["flagged"]}
        entries = [("overall", overall["metrics"].get(m, {}))] + [(g["name"], g["metrics"].get(m, {})) for g in tested]
        entries = [(name, e) for name, e in entries if e.get("value") is not None]
        if len(entries) < 2:
            continue
        fig = plots.forest_figure([f"{name} (n={_n(audit, name)})" for name, _ in entries],
                                  [_nan(e["value"]) for _, e in entries],
                                  [_nan((e.get("ci95") or [None, None])[0]) for _, e in entries],
                                  [_nan((e.get("ci95") or [None, None])[1]) for _, e in entries],
                                  reference=_nan(overall["metrics"][m]["value"]),
                                  flagged=[name in flags for name, _ in entries], xlabel=label(m),
                                  title=f"{label(m)} by group")  # fmt: skip
        rep.figure(fig, f"{label(m)} per group with 95% bootstrap CIs; dotted line: overall; red: flagged.",
                   name=f"forest_{m}")  # fmt: skip
    classes = audit["input"]["classes"]
    if tested:
        matrix = np.asarray([[_nan(g["metrics"].get(f"recall[{c}]", {}).get("value")) for c in classes]
                             for g in tested])  # fmt: skip
        rep.figure(plots.heatmap_figure(matrix, [g["name"] for g in tested], classes, "Recall (TPR) by group and "
                                        "class", label="recall"),
                   "Per-class recall of each testable group (blank: the class is absent from the group).",
                   name="recall_heatmap")  # fmt: skip


def _verdict(row: dict[str, Any]) -> str:
    """``YES``, ``no (MDE 14.2 points)``, ``no (no MDE: ...)`` or ``not tested``."""
    if row["flagged"]:
        return "YES"
    if row.get("p_value") is None:
        return "not tested"
    if row.get("mde") is None:
        return "no (no gap size is sure to be found)"
    return f"no (MDE {format_gap(row.get('metric', ''), row['mde'])})"


def _detectable_gaps(rep: Report, audit: dict[str, Any]) -> None:
    """Every primary verdict that is not a flag with its minimum detectable effect; the tests skipped and why."""
    quiet = audit["summary"].get("not_flagged", [])
    if quiet:
        rep.heading("Detectable gaps")
        rep.paragraph("Each primary comparison that was not flagged, with the smallest gap its test finds "
                      f"{audit['config'].get('mde_power', 0.8):.0%} of the time at alpha "
                      f"{audit['config']['alpha']} over the family's tests (its minimum detectable effect); "
                      "groups below the minimum size were not tested and have none."
                      + (" Each group is tested on every primary metric and flagged when any of its tests is; each "
                         "MDE is that statistic's alone, so a gap that shows in both is found at least as often."
                         if len(primary_metrics(audit["config"])) > 1 else ""))  # fmt: skip
        rep.bullets([q["text"] for q in quiet])
    lines = [f"{g['name']}: {n}." for g in audit["groups"] for n in g.get("notes", [])]
    listed = {(g["name"], s["metric"]) for g in audit["groups"] for s in g.get("skipped_tests", [])}
    lines += [f"{g['name']}: {s['metric']} not tested ({s['reason']})." for g in audit["groups"]
              for s in g.get("skipped_tests", [])]  # fmt: skip
    lines += [f"{c['group']}: {c['metric']} not tested ({c['skipped']})." for c in audit["comparisons"]
              if c.get("skipped") and (c["group"], c["metric"]) not in listed and "[" not in c["metric"]]  # fmt: skip
    if lines:
        rep.heading("Skipped tests")
        rep.bullets(lines)


def _n(audit: dict[str, Any], name: str) -> int:
    if name == "overall":
        return int(audit["overall"]["n"])
    return next(int(g["n"]) for g in audit["groups"] if g["name"] == name)


def _how_corrected(config: dict[str, Any]) -> str:
    """``with Holm`` or, for Westfall-Young, which family gets what (and how the primary alpha is shared)."""
    name = _CORRECTIONS.get(config["correction"], config["correction"])
    if config["correction"] == "westfall-young":
        text = ("with Westfall-Young step-down min-P in the primary family (all its tests on the same "
                f"{config['n_perm']} within-class shuffles, so their dependence is accounted for) and Holm in the "
                "secondary family")  # fmt: skip
    else:
        text = f"with {name}"
    if config.get("primary_weights") == "attributes":
        text += ("; the primary family's alpha is shared equally among the audited attributes, then among each "
                 "attribute's tests")  # fmt: skip
    return text


def write_audit_report(out: Path, audit: dict[str, Any]) -> tuple[Path, Path]:
    """Render ``audit.html`` and ``audit.md`` (+ ``audit_files/``) for a stratified audit."""
    from milcore.report.files import write_report_atomic

    rep = Report(f"Bias audit of {audit['input']['run']}")
    add_audit_sections(rep, audit)
    add_glossary(rep, [*AUDIT_TERMS, "log-odds", "log-loss", "Brier score", "minimum detectable effect",
                       _CORRECTIONS.get(audit["config"]["correction"], "Holm"), "Holm"])  # fmt: skip
    return write_report_atomic(Path(out), rep, "audit")
