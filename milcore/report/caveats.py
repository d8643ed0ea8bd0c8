"""When a result must not be read as a decision: the rules, written once, and the warnings they raise.

Every report (training run, ``predict`` scoring, audit, bench) applies the same rules and writes what
they find twice: as a boxed list at the top of the human-readable report, and as a ``warnings`` list in
its JSON (``metrics.json``, ``audit.json``, ``bench.json``) so that a pipeline can act on it. A warning
is a dictionary ``{"code", "severity", "message", ...details}``; ``severity`` is ``"critical"`` (the
result must not be used as it stands) or ``"caution"`` (read the result with this in mind).

The rules (codes):

* ``chance`` (critical): the 95% CI of balanced accuracy includes chance (1 / number of classes present
  among the labels: what always predicting one class scores; the model's class count when fewer than
  two are present) or the CI of AUROC includes 0.5 -- "not distinguishable from chance on this cohort". Without a CI the
  point value is compared with chance instead (and ``no_ci`` is raised).
* ``below_chance`` (critical): the whole CI lies below chance: systematically wrong, typically labels
  that do not belong to the predictions (class order, bag ids, another task).
* ``single_predicted_class`` (critical): every patient received the same diagnosis although several
  classes are present.
* ``temperature_at_bound`` (critical at the upper bound, caution at the lower): a fitted temperature is
  within 1% of a bound of :data:`milcore.metrics.calibration.TEMPERATURE_BOUNDS`. Upper: probabilities
  flattened to near-uniform (a low ECE then means nothing); lower: sharpened to near 0/1 (overconfident).
* ``class_smaller_than_folds`` (critical): a class has fewer patients than cross-validation folds, so
  some test folds hold none of them and its per-fold metrics are undefined.
* ``small_class`` (caution): a class has fewer than :data:`MIN_PATIENTS_PER_CLASS` patients.
* ``wide_ci`` (caution): a headline CI (balanced accuracy, AUROC) is wider than :data:`MAX_CI_WIDTH`:
  the cohort is too small to estimate it usefully.
* ``no_ci`` (caution): a headline metric has no CI (too few patients or a class missing in most
  resamples).
* audit only: ``small_groups`` (caution: groups below the audit's minimum size, shown but not tested)
  and ``no_testable_group`` (critical: nothing could be tested, so the audit says nothing about bias).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from milcore.metrics import CHANCE_METRICS
from milcore.metrics import label as metric_label
from milcore.metrics.calibration import TEMPERATURE_BOUNDS, temperature_at_bound
from milcore.report.document import Report, fmt, plural

#: A headline 95% CI wider than this (in metric units) is too imprecise to support a claim.
MAX_CI_WIDTH = 0.30
#: Fewer patients than this in a class: per-class recall and AUROC rest on a handful of patients.
MIN_PATIENTS_PER_CLASS = 10
#: Codes meaning "this model is no better than chance here".
CHANCE_CODES = ("chance", "below_chance")
_TOL = 1e-9


def chance_classes(support: Sequence[int] | np.ndarray, num_classes: int) -> int:
    """The class count that sets the balanced-accuracy chance level: classes present, else the model's."""
    present = int((np.asarray(support) > 0).sum())
    return present if present >= 2 else int(num_classes)


def chance_level(metric: str, num_classes: int) -> float | None:
    """What a model ignoring its input scores: balanced accuracy 1/C, AUROC 0.5; ``None`` for other metrics."""
    if metric == "balanced_accuracy":
        return 1.0 / max(int(num_classes), 1)
    if metric == "auroc":
        return 0.5
    return None


def _warning(code: str, severity: str, message: str, **details: Any) -> dict[str, Any]:
    return {"code": code, "severity": severity, "message": message, **details}


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(float(x))


def _ci_text(value: float, ci: Sequence[float] | None) -> str:
    if ci is not None and len(ci) == 2 and all(_finite(c) for c in ci):
        return f"{fmt(float(value))} [95% CI {fmt(float(ci[0]))}, {fmt(float(ci[1]))}]"
    return f"{fmt(float(value))} (no CI)"


def headline_warnings(metrics: Mapping[str, Mapping[str, Any]], num_classes: int, *,
                      subject: str = "This model", **context: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Chance, below-chance, wide-CI and missing-CI warnings for the headline metrics.

    Args:
        metrics: ``{name: {"value": v, "ci95": [low, high]}}`` holding ``balanced_accuracy`` and/or ``auroc``.
        num_classes: classes present among the labels (sets the balanced-accuracy chance level).
        subject: how the message names the model, e.g. ``"Model abmil"``.
        **context: extra keys for every warning (e.g. ``model="abmil"``).

    Returns:
        The warnings (empty when the metrics are clear of chance and precise enough).
    """
    at_chance: dict[str, dict[str, Any]] = {}
    below: dict[str, dict[str, Any]] = {}
    wide: dict[str, float] = {}
    no_ci: list[str] = []
    for name in CHANCE_METRICS:
        entry = metrics.get(name)
        if not entry or not _finite(entry.get("value")):
            continue
        value, ci = float(entry["value"]), entry.get("ci95")
        chance = chance_level(name, num_classes)
        has_ci = ci is not None and len(ci) == 2 and all(_finite(c) for c in ci)
        lo, hi = (float(ci[0]), float(ci[1])) if has_ci else (value, value)
        if not has_ci:
            no_ci.append(name)
        info = {"value": value, "ci95": [lo, hi] if has_ci else None, "chance": chance}
        if hi < chance - _TOL:
            below[name] = info
        elif lo <= chance + _TOL:
            at_chance[name] = info
        if has_ci and hi - lo > MAX_CI_WIDTH:
            wide[name] = hi - lo
    out: list[dict[str, Any]] = []
    if at_chance:
        said = "; ".join(f"{metric_label(k)} {_ci_text(v['value'], v['ci95'])} includes chance ({fmt(v['chance'])})"
                         for k, v in at_chance.items())  # fmt: skip
        out.append(_warning("chance", "critical", f"{subject} is not distinguishable from chance on this cohort: "
                            f"{said}. Its predictions must not be used for decisions.", metrics=at_chance,
                            **context))  # fmt: skip
    if below:
        said = "; ".join(f"{metric_label(k)} {_ci_text(v['value'], v['ci95'])} is below chance ({fmt(v['chance'])})"
                         for k, v in below.items())  # fmt: skip
        out.append(_warning("below_chance", "critical", f"{subject} is worse than chance on this cohort: {said}. "
                            "Check that the labels belong to these predictions (class order, bag ids, task).",
                            metrics=below, **context))  # fmt: skip
    if wide:
        said = " and that of ".join(f"{metric_label(k)} is {fmt(w)} wide" for k, w in wide.items())
        out.append(_warning("wide_ci", "caution", f"The cohort is too small for a precise estimate: the 95% CI of "
                            f"{said} (more than {MAX_CI_WIDTH:g}).", metrics=wide, width=max(wide.values()),
                            **context))  # fmt: skip
    if no_ci:
        said = " and ".join(metric_label(k) for k in no_ci)
        out.append(_warning("no_ci", "caution", f"No confidence interval could be computed for {said} (too few "
                            "patients, or a class missing from most resamples); the point value alone proves nothing.",
                            metrics=no_ci,
                            **context))  # fmt: skip
    return out


def prediction_warnings(confusion: np.ndarray | Sequence[Sequence[int]], classes: Sequence[str], *,
                        subject: str = "This model", **context: Any) -> list[dict[str, Any]]:  # fmt: skip
    """``single_predicted_class`` when every patient got the same diagnosis though several classes are present.

    Args:
        confusion: (C, C) counts, rows = true class, columns = predicted class.
        classes: class names.
        subject: how the message names the model.
        **context: extra keys for the warning.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    if cm.size == 0 or cm.sum() == 0:
        return []
    predicted = np.flatnonzero(cm.sum(axis=0))
    present = np.flatnonzero(cm.sum(axis=1))
    if len(predicted) == 1 and len(present) > 1:
        name = classes[int(predicted[0])]
        return [_warning("single_predicted_class", "critical", f"{subject} predicted {name!r} for all "
                         f"{plural(int(cm.sum()), 'patient')}: it does not separate the classes.", predicted=name,
                         **context)]  # fmt: skip
    return []


def temperature_warnings(temperatures: Sequence[float], where: Sequence[str], **context: Any) -> list[dict[str, Any]]:
    """One ``temperature_at_bound`` warning per bound reached, naming where (folds, runs) it happened.

    Args:
        temperatures: fitted temperatures.
        where: a label for each (``"fold 0"``, ``"abmil seed 1 fold 2"``).
        **context: extra keys for every warning.
    """
    hits: dict[str, list[tuple[str, float]]] = {}
    for t, label in zip(temperatures, where, strict=True):
        bound = temperature_at_bound(t)
        if bound:
            hits.setdefault(bound, []).append((label, float(t)))
    out = []
    lo, hi = TEMPERATURE_BOUNDS
    for bound, items in hits.items():
        labels = [label for label, _ in items]
        shown = ", ".join(f"{label} (T = {t:.3f})" for label, t in items)
        if bound == "upper":
            text = (f"The fitted temperature hit the upper bound of its search range ({hi:g}) in {shown}: the "
                    "validation patients found no usable signal in the scores, so the calibrated probabilities "
                    "are flattened to near-uniform (about 1/C for every class). A low ECE there means nothing.")
            severity = "critical"
        else:
            text = (f"The fitted temperature hit the lower bound of its search range ({lo:g}) in {shown}: the "
                    "validation fold was perfectly separated, so the probabilities are sharpened to near 0 or 1 "
                    "and will be overconfident on new patients.")
            severity = "caution"
        out.append(_warning("temperature_at_bound", severity, text, bound=bound, where=labels,
                            temperatures=[t for _, t in items], bounds=[lo, hi], **context))  # fmt: skip
    return out


def class_size_warnings(support: Mapping[str, int], folds: int | None = None, **context: Any) -> list[dict[str, Any]]:
    """``class_smaller_than_folds`` and ``small_class`` from the number of patients per class.

    Args:
        support: class -> number of labelled patients.
        folds: cross-validation folds (``None``: no cross-validation, only the small-class rule).
        **context: extra keys for every warning.
    """
    out = []
    if folds:
        few = {c: int(n) for c, n in support.items() if int(n) < folds}
        if few:
            said = ", ".join(f"{c}: {plural(n, 'patient')}" for c, n in few.items())
            out.append(_warning("class_smaller_than_folds", "critical", f"Too small for {folds}-fold "
                                f"cross-validation: {said}, i.e. fewer patients than folds, so some test folds "
                                "hold none of them and their per-fold metrics are undefined.", classes=few,
                                folds=int(folds), **context))  # fmt: skip
    small = {c: int(n) for c, n in support.items() if int(n) < MIN_PATIENTS_PER_CLASS}
    if small:
        said = ", ".join(f"{c}: {n}" for c, n in small.items())
        out.append(_warning("small_class", "caution", f"Fewer than {MIN_PATIENTS_PER_CLASS} patients in "
                            f"{plural(len(small), 'class', 'classes')} ({said}): their recall and AUROC rest on a "
                            "handful of patients.", classes=small, minimum=MIN_PATIENTS_PER_CLASS,
                            **context))  # fmt: skip
    return out


def is_at_chance(warnings: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the warnings say the model is not better than chance."""
    return any(w["code"] in CHANCE_CODES for w in warnings)


def add_warnings(rep: Report, warnings: Sequence[Mapping[str, Any]]) -> Report:
    """Add the warnings as a box (critical ones first); nothing when there are none."""
    critical = [w["message"] for w in warnings if w["severity"] == "critical"]
    caution = [w["message"] for w in warnings if w["severity"] != "critical"]
    if critical:
        rep.warnings("Warning: read this before using these results", critical + caution, critical=True)
    elif caution:
        rep.warnings("Warning: limits of these results", caution, critical=False)
    return rep


def log_warnings(logger: Any, warnings: Sequence[Mapping[str, Any]]) -> None:
    """Log every warning on ``logger`` (critical ones at WARNING level, the others at INFO), prefixed ``warning:``."""
    for w in warnings:
        logger.log(logging.WARNING if w["severity"] == "critical" else logging.INFO, "warning: %s", w["message"])
