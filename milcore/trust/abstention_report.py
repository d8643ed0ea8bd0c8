"""Uncertainty and abstention in reports: the risk-coverage section of a training run's report and the report of
a prediction folder (``milcore predict``: how many patients were referred for review, which ones, and, for a
labelled cohort, the risk-coverage curves of the new patients)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from milcore.report import Report, fmt, plots, plural

log = logging.getLogger(__name__)

#: ``evaluation`` of a training run's out-of-fold predictions.
OUT_OF_FOLD = "out-of-fold"
#: Rows of the per-patient table of a prediction report (the most uncertain first).
MAX_PATIENT_ROWS = 200


def uncertainty_section(rep: Report, summary: dict[str, Any], patients: int, evaluation: str = OUT_OF_FOLD) -> None:
    """Risk-coverage curves, AURC against a random ranking, balanced accuracy at each coverage, and how many
    patients a referral threshold sends for review (``metrics.json["uncertainty"]``).

    Args:
        rep: the report to extend.
        summary: :func:`~milcore.trust.uncertainty.selective_summary`'s output.
        patients: patients predicted.
        evaluation: which predictions were ranked (``"out-of-fold"`` for a training run's, or a phrase for
            new patients); out-of-fold thresholds get a note that they are optimistic.
    """
    scores = summary.get("scores") or {}
    rep.heading("Uncertainty and abstention")
    if not scores:
        rep.paragraph(f"No uncertainty score could be evaluated (no labelled {evaluation} prediction).")
        return
    best = summary.get("best")
    rep.paragraph(f"Patients ranked from most to least certain ({evaluation}). Keeping only the most certain ones and "
                  "referring the others for manual review trades coverage for accuracy. Scores are scaled to 0 "
                  "(certain) .. 1 (maximally uncertain); a random ranking's AURC is the error rate.")  # fmt: skip
    coverages = list(next(iter(scores.values()))["at_coverage"])
    rows = []
    for name, v in scores.items():
        rows.append([name + (" (best)" if name == best else ""), fmt(v["aurc"]), fmt(v["random_aurc"]),
                     fmt(v["oracle_aurc"]), *[fmt(v["at_coverage"][c]["balanced_accuracy"]) for c in coverages]])
    rep.table(["score", "AURC", "random", "ideal", *[f"BA at {float(c):.0%}" for c in coverages]], rows,
              caption="AURC: mean error rate over all coverages (lower is better); BA: balanced accuracy of the kept "
                      "patients at that coverage.")  # fmt: skip
    grid = np.linspace(0.05, 1.0, 20)
    series, ba_series = {}, {}
    for name, v in scores.items():
        curve = v["curve"]
        series[name] = np.interp(grid, curve["coverage"], curve["risk"]).tolist()
        ba_series[name] = np.interp(grid, curve["coverage"], curve["balanced_accuracy"]).tolist()
    first = next(iter(scores.values()))
    series["random ranking"] = [first["random_aurc"]] * len(grid)
    rep.figure(plots.lines_figure(grid.tolist(), series, "coverage (share of patients kept)", "error rate of the kept",
                                  "Risk-coverage"), "Error rate of the patients kept, most certain first.")  # fmt: skip
    rep.figure(plots.lines_figure(grid.tolist(), ba_series, "coverage (share of patients kept)",
                                  "balanced accuracy of the kept", "Balanced accuracy vs coverage"),
               "Balanced accuracy of the patients kept, most certain first.")  # fmt: skip
    v = scores.get(best, first)
    name = best if best in scores else next(iter(scores))
    lines = []
    at80 = v["at_coverage"].get("0.8")
    if at80:
        k = patients - round(at80["coverage"] * patients)
        lines.append(f"At 80% coverage by {name} (referring the patients above {fmt(at80['threshold'])}): {k} of "
                     f"{plural(patients, 'patient')} referred for review; balanced accuracy of the rest "
                     f"{fmt(at80['balanced_accuracy'])} (all: {fmt(v['at_coverage']['1']['balanced_accuracy'])}).")
    for target, hit in v["coverage_for_balanced_accuracy"].items():
        if hit is None:
            lines.append(f"Balanced accuracy {target} is not reached at any coverage by {name}.")
        else:
            lines.append(f"Balanced accuracy {target}: 'milcore predict --abstain-score {name} --abstain-above "
                         f"{hit['threshold']:.3g}' kept {hit['coverage']:.0%} here ({hit['referred']} of "
                         f"{plural(patients, 'patient')} referred for review; balanced accuracy "
                         f"{fmt(hit['balanced_accuracy'])}).")  # fmt: skip
    rep.bullets(lines)
    skipped = summary.get("skipped") or {}
    if skipped:
        rep.paragraph("Not computed: " + "; ".join(f"{k}: {why}" for k, why in skipped.items()) + ".", css="muted")
    if evaluation == OUT_OF_FOLD:
        rep.paragraph("Thresholds chosen on these out-of-fold predictions are optimistic for new patients: check the "
                      "share referred on the next cohort.", css="note")  # fmt: skip


def prediction_report(folder: str | Path, bag_ids: list[str], classes: list[str], proba: np.ndarray,
                      labels: np.ndarray, uncertainty: dict[str, np.ndarray], meta: dict[str, Any],
                      metrics: dict[str, Any] | None) -> tuple[Path, Path]:  # fmt: skip
    """``report.html`` / ``report.md`` of a prediction folder.

    Args:
        folder: the prediction folder (written into; the caller moves it into place).
        bag_ids: (B,) patients.
        classes: class names.
        proba: (B, C) ensemble probabilities.
        labels: (B,) true class, -1 where unknown.
        uncertainty: per score, (B,) values in [0, 1] (``Uncertainty.scores``).
        meta: ``predictions.json`` (its ``abstention`` says who is referred).
        metrics: ``metrics.json`` of a labelled cohort, else ``None``.

    Returns:
        (html path, markdown path).
    """
    from milcore.report.glossary import UNCERTAINTY_TERMS, add_glossary

    n = len(bag_ids)
    rep = Report(f"Predictions — {meta.get('task')} ({plural(n, 'patient')})")
    rep.paragraph(f"Bank {meta.get('bank')}; cohort {meta.get('cohort') or '–'}; ensemble of "
                  f"{plural(len(meta.get('checkpoints') or []), 'model')}. Every prediction is a suggestion for a "
                  "hematologist's review.")  # fmt: skip
    ab = meta.get("abstention")
    rep.heading("Referred for review")
    score = ab["score"] if ab else next(iter(uncertainty), None)
    referred = set(ab["referred_ids"]) if ab else set()
    if ab:
        rep.paragraph(ab["sentence"] + ".")
        acc = (metrics or {}).get("abstention", {}).get("accepted")
        if acc and acc.get("n"):
            everyone = (metrics or {})["abstention"].get("all", {})
            rep.paragraph(f"Balanced accuracy of the {plural(acc['n'], 'accepted patient')}: "
                          f"{fmt(acc['balanced_accuracy'])} (all labelled: {fmt(everyone.get('balanced_accuracy'))}"
                          f"); errors among the referred: {ab.get('referred_errors', '–')} of "
                          f"{ab.get('referred_labelled', '–')}.")  # fmt: skip
    else:
        rep.paragraph("No referral threshold was set (milcore predict --abstain-above U refers the patients whose "
                      "uncertainty is above U): every patient below is a prediction to review.", css="note")
    if score is not None:
        values = np.asarray(uncertainty[score], dtype=float)
        order = np.argsort(-values, kind="stable")[:MAX_PATIENT_ROWS]
        pred = np.asarray(proba).argmax(axis=1)
        rows = [[bag_ids[i], classes[pred[i]], fmt(float(proba[i, pred[i]])), fmt(float(values[i])),
                 classes[labels[i]] if labels[i] >= 0 else "–", "yes" if bag_ids[i] in referred else "no"]
                for i in order]  # fmt: skip
        more = f" (the {MAX_PATIENT_ROWS} most uncertain of {n})" if n > MAX_PATIENT_ROWS else ""
        rep.table(["patient", "predicted", "probability", f"uncertainty ({score})", "true", "referred"], rows,
                  caption=f"Patients from most to least uncertain{more}; all in predictions.csv.")
    if metrics and metrics.get("uncertainty"):
        uncertainty_section(rep, metrics["uncertainty"], n, evaluation="these patients, predicted by the ensemble")
    add_glossary(rep, list(UNCERTAINTY_TERMS))
    return rep.write(folder, "report")
