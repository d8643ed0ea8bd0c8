"""``milcore audit --run RUN --cohort COHORT.csv --out DIR``: the stratified audit of a run's predictions."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import OutputExistsError, UserError
from milcore.audit.config import AuditConfig

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


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean_json(payload), indent=1, default=_default, allow_nan=False))
    os.replace(tmp, path)


def clean_json(obj: Any) -> Any:
    """A copy with NaN/inf floats as ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def _default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_report_atomic(out: Path, report, name: str) -> tuple[Path, Path]:
    """Render a :class:`milcore.report.Report` in a scratch folder, then move its files into ``out``."""
    scratch = out / f".{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    html, md = report.write(scratch, name)
    figures = scratch / f"{name}_files"
    if figures.exists():
        shutil.rmtree(out / f"{name}_files", ignore_errors=True)
        os.replace(figures, out / f"{name}_files")
    os.replace(html, out / html.name)
    os.replace(md, out / md.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return out / html.name, out / md.name


def audit_run(run: str | Path, cohort: str | Path, out: str | Path, config: AuditConfig | None = None, *,
              overwrite: bool = False, report: bool = True) -> dict[str, Any]:  # fmt: skip
    """Audit a run's out-of-fold predictions by the cohort's sex, age and site; writes ``audit.json/.md/.html``.

    Args:
        run: a training run or ``milcore predict`` folder with ``predictions.csv``.
        cohort: the cohort table with ``age``/``sex``/``site`` columns (whatever exists is audited).
        out: output folder.
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
    from milcore.predict import prediction_sources, read_predictions

    config = config or AuditConfig()
    t0 = time.perf_counter()
    out = Path(out)
    table = read_predictions(run)
    pred_path = Path(run) / "predictions.csv"
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
    sources = prediction_sources(run)
    notes = list(groups.notes)
    if sources.get("partial"):
        notes.insert(0, f"PARTIAL: these predictions come from an {sources['ensemble']} (an interrupted training "
                        "run), not the full model.")  # fmt: skip
        log.warning("audit: %s", notes[0])
    prepare_out(out, overwrite)
    result = audit_predictions(pred, list(table.classes), groups, config)
    audit: dict[str, Any] = {
        "format": AUDIT_FORMAT, "format_version": 1,
        "input": {"run": str(run), "predictions": str(pred_path), "cohort": str(cohort), "classes": table.classes,
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
    write_json_atomic(out / "audit.json", audit)
    if report:
        write_audit_report(out, audit)
    log.info("audit: %s", audit["summary"]["headline"])
    return audit
