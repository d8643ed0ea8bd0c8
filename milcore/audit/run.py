"""``milcore audit --run RUN --cohort COHORT.csv --out DIR``: the stratified audit of a run's predictions."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import OutputExistsError, UserError
from milcore.audit.config import AuditConfig
from milcore.report.files import write_json_atomic

log = logging.getLogger(__name__)

AUDIT_FORMAT = "milcore-audit"


def prepare_out(out: Path, overwrite: bool, create: bool = True) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` (then only audit files are replaced); create it if asked.

    Pass ``create=False`` to check before the inputs are validated, so bad input leaves no empty folder.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite to replace the audit)")
    if create:
        out.mkdir(parents=True, exist_ok=True)


def _predictions_of(run: Any) -> tuple[Any, str, dict[str, Any]]:
    """The labelled table, how to name it, and its sources (kind, ensemble, partial) for any prediction holder."""
    from milcore.data.predictions import PredictionTable, prediction_sources, read_predictions

    if isinstance(run, str | Path):
        return read_predictions(run), str(Path(run) / "predictions.csv"), prediction_sources(run)
    if isinstance(run, PredictionTable):
        return run, "the predictions", {"kind": "table"}
    table = getattr(run, "predictions", None) or getattr(run, "table", None)  # CVResult / PredictionRun
    if not isinstance(table, PredictionTable):
        raise UserError(f"cannot audit a {type(run).__name__}: give a run or prediction folder, a CVResult, a "
                        "PredictionRun or a PredictionTable")  # fmt: skip
    ensemble = getattr(run, "checkpoints", None)
    partial = bool(getattr(ensemble, "partial", False))
    kind = "run" if hasattr(run, "folds") else "predict"
    return table, f"the {'out-of-fold ' if kind == 'run' else ''}predictions in memory", {
        "kind": kind, "ensemble": ensemble.describe() if ensemble is not None else None, "partial": partial}


def audit_run(run: Any, cohort: str | Path, out: str | Path | None = None, config: AuditConfig | None = None, *,
              overwrite: bool = False, report: bool = True) -> dict[str, Any]:  # fmt: skip
    """Audit labelled predictions by the cohort's sex, age and site; with ``out``, writes ``audit.json/.md/.html``.

    Args:
        run: a training run or ``milcore predict`` folder with ``predictions.csv``, or predictions in memory:
            a :class:`~milcore.crossval.CVResult` (its out-of-fold predictions), a
            :class:`~milcore.prediction.PredictionRun` or a :class:`~milcore.data.predictions.PredictionTable`.
        cohort: the cohort table with ``age``/``sex``/``site`` columns (whatever exists is audited).
        out: output folder; ``None`` writes nothing.
        config: the audit configuration.
        overwrite: replace an existing audit in ``out``.
        report: also render ``audit.md``/``audit.html`` (benchmarks that only need the JSON skip it).

    Returns:
        The content of ``audit.json``.

    Raises:
        UserError: no predictions, no labels, no bag in common, none of the audited columns.
    """
    from milcore.audit.groups import build_groups, read_metadata
    from milcore.audit.report import write_audit_report
    from milcore.audit.stratified import audit_predictions
    from milcore.metrics.weighted import LabelledPredictions

    config = config or AuditConfig()
    t0 = time.perf_counter()
    out = Path(out) if out is not None else None
    table, pred_path, sources = _predictions_of(run)
    if not table.bag_ids:
        raise UserError(f"{pred_path}: no predictions in the file")
    labelled = table.labels >= 0
    if not labelled.any():
        raise UserError(f"{pred_path}: no prediction has a label; an audit needs labelled predictions "
                        f"(re-run 'milcore predict' with --cohort and --task)")  # fmt: skip
    ids = [b for b, ok in zip(table.bag_ids, labelled, strict=True) if ok]
    columns, matched, missing = read_metadata(cohort, ids)
    if missing:
        log.warning("%s: %d predicted bags are not in the cohort table and are left out (e.g. %s)", cohort,
                    len(missing), ", ".join(missing[:3]))  # fmt: skip
    pos = {b: i for i, b in enumerate(table.bag_ids)}
    idx = np.asarray([pos[b] for b in matched], dtype=np.int64)
    pred = LabelledPredictions(table.labels[idx], table.proba[idx], n_bins=config.n_bins)
    groups = build_groups(columns, len(matched), config)
    for note in groups.notes:
        log.info("audit: %s", note)
    notes = list(groups.notes)
    if sources.get("partial"):
        notes.insert(0, f"PARTIAL: these predictions come from an {sources['ensemble']} (an interrupted training "
                        "run), not the full model.")  # fmt: skip
        log.warning("audit: %s", notes[0])
    if out is not None:
        prepare_out(out, overwrite)
    result = audit_predictions(pred, list(table.classes), groups, config)
    audit: dict[str, Any] = {
        "format": AUDIT_FORMAT, "format_version": 1,
        "input": {"run": str(run) if isinstance(run, str | Path) else None, "predictions": pred_path,
                  "cohort": str(cohort), "classes": table.classes,
                  "patients": len(matched), "unlabelled_predictions": int((~labelled).sum()),
                  "not_in_cohort": len(missing), "not_in_cohort_examples": missing[:10],
                  "kind": sources.get("kind"), "ensemble": sources.get("ensemble"),
                  "partial": bool(sources.get("partial"))},
        "config": config.to_dict(),
        "attributes": {"audited": list(groups.values), "missing": groups.missing},
        "notes": notes,
        **result,
    }  # fmt: skip
    audit["seconds"] = time.perf_counter() - t0
    if out is not None:
        write_json_atomic(out / "audit.json", audit)
        if report:
            write_audit_report(out, audit)
    log.info("audit: %s", audit["summary"]["headline"])
    return audit
