"""The model passport of a training run: what the model is for, what it was built from and how far to trust it.

Every training run writes ``passport.json`` (machine-readable, schema: ``docs/passport.schema.json``) and
``passport.md`` (the same for a reader) into its folder; ``milcore passport RUN`` writes them again, e.g.
after a bias audit or a shortcut check. The passport is assembled from the run folder's own records
(``config.yaml``, ``metrics.json``, ``splits.json``, the fold checkpoint cards) and the bank the run was
trained on, plus, where they exist, a subgroup audit (``RUN/audit/audit.json`` or the one given), a
shortcut check (``RUN/shortcuts.json``, from ``milcore audit shortcuts``) and morphological concepts
(``RUN/concepts.json``, or attributes in ``RUN/explain/explain.json``). What has not been checked is said
as "not checked", never left out.

Sections (after FUTURE-AI's AI passport): intended use; data provenance (cohort, bank and encoder
fingerprints, cell counts); splits; performance with 95% CIs; calibration; uncertainty and abstention;
subgroups; shortcuts; concepts; software versions; known limitations (the caveats of
:mod:`milcore.report.caveats` plus what the evaluation cannot show).

A passport is refused for a bank from another encoder than the run's, or whose contents differ from the
bank the run was trained on.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import UserError

log = logging.getLogger(__name__)

PASSPORT_FORMAT = "milcore-passport"
PASSPORT_VERSION = 1
PASSPORT_JSON = "passport.json"
PASSPORT_MD = "passport.md"
#: The shortcut check's output in a run folder (``milcore audit shortcuts --run RUN``).
SHORTCUTS_FILE = "shortcuts.json"
#: Where ``milcore passport`` looks for a subgroup audit when none is given.
DEFAULT_AUDIT = Path("audit") / "audit.json"
#: The JSON Schema, in the source tree (``docs/``); validation is skipped where it is not installed.
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "passport.schema.json"

INTENDED_USE = (
    "Decision support for hematologists reviewing peripheral blood smears: the model suggests the "
    "patient-level diagnosis {task} ({classes}) from the patient's white-cell features, with calibrated "
    "probabilities, an uncertainty score, the cells that drove the decision and similar training cases. "
    "A hematologist reviews every case; patients whose uncertainty is above the chosen threshold are "
    "referred for manual review."
)
NOT_INTENDED = (
    "standalone diagnosis or screening without a hematologist's review",
    "patients, stains, scanners or sites unlike the training cohort without external validation",
    "feature banks from any other encoder than the one fingerprinted here (refused by milcore)",
    "diagnoses outside the classes listed",
)


# ----------------------------------------------------------------------------- reading the run
def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no {what} here") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: unreadable {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object")
    return data


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _ci(entry: Mapping[str, Any] | None) -> dict[str, Any]:
    entry = entry or {}
    ci = entry.get("ci95")
    ci = [_finite(ci[0]), _finite(ci[1])] if isinstance(ci, list | tuple) and len(ci) == 2 else [None, None]
    return {"value": _finite(entry.get("value")), "ci95": ci}


def _summary(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {"min": None, "median": None, "max": None}
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def _data_section(cfg: dict[str, Any], bank_path: str | Path, run: Path) -> dict[str, Any]:
    """Cohort, bank and encoder provenance; refuses a bank from another encoder or with other contents."""
    from feature_cache.bank import EncoderInfo, open_reader
    from milcore.data.cohort import read_cohort
    from milcore.data.inputs import bank_fingerprint, labels_fingerprint

    spec = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
    inputs = cfg.get("inputs") if isinstance(cfg.get("inputs"), dict) else {}
    recorded = cfg.get("encoder")
    if not isinstance(recorded, dict):
        raise UserError(f"{run}/config.yaml: records no encoder fingerprint; the passport cannot tie the model to "
                        "a bank")  # fmt: skip
    bank_path = Path(bank_path)
    if not bank_path.exists():
        raise UserError(f"{bank_path}: the run's bank is not there (moved?); pass the bank it was trained on "
                        "(milcore passport RUN --bank BANK)")  # fmt: skip
    bank = open_reader(bank_path)
    EncoderInfo.from_dict(recorded).check_compatible(bank.info, where=f"{bank_path} (passport of {run})")
    cohort_path = inputs.get("cohort") or spec.get("cohort")
    task = spec.get("task")
    if not cohort_path or not Path(cohort_path).exists():
        raise UserError(f"{cohort_path}: the run's cohort table is not there (moved?)")
    cohort = read_cohort(cohort_path, str(task), classes=cfg.get("classes"))
    ids = [b for b in cohort.bag_ids if b in set(bank.bag_ids())]
    if inputs.get("bank_fingerprint"):
        now = bank_fingerprint(bank, ids)
        if now != inputs["bank_fingerprint"]:
            raise UserError(f"{bank_path}: not the bank {run} was trained on (bag ids, cell counts or features "
                            "differ from the fingerprint in config.yaml)")  # fmt: skip
    cohort = cohort.subset(ids)
    sizes = bank.bag_sizes()[[bank.index_of(b) for b in ids]] if ids else np.zeros(0, np.int64)
    columns = cohort.columns
    site = columns.get("site")
    sex = columns.get("sex")
    age = columns.get("age")
    ages = np.asarray([float(a) for a in age if a.replace(".", "", 1).isdigit()]) if age is not None else None
    return {
        "cohort": {
            "path": str(Path(cohort_path).resolve()), "task": task, "patients": len(ids),
            "labels_fingerprint": labels_fingerprint(cohort), "class_counts": cohort.class_counts(),
            "sites": {str(k): int(v) for k, v in zip(*np.unique(site, return_counts=True), strict=True)}
            if site is not None else None,
            "sex": {str(k or "unknown"): int(v) for k, v in zip(*np.unique(sex, return_counts=True), strict=True)}
            if sex is not None else None,
            "age": _summary(ages) if ages is not None else None,
        },
        "bank": {"path": str(bank_path.resolve()), "fingerprint": bank_fingerprint(bank, ids), "bags": len(ids),
                 "cells": int(sizes.sum()), "cells_per_patient": _summary(sizes), "dim": int(bank.dim)},
        "encoder": bank.info.to_dict(),
    }  # fmt: skip


def _model_section(cfg: dict[str, Any], metrics: dict[str, Any], run: Path) -> dict[str, Any]:
    from milcore.training.checkpoint import CARD_HASH, WEIGHTS_HASH, read_card

    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    checkpoints = []
    for path in sorted(run.glob("fold_*/checkpoint.json"), key=lambda p: int(p.parent.name.split("_")[1])):
        _, card = read_card(path)
        checkpoints.append({"fold": int(path.parent.name.split("_")[1]), "path": str(path.parent.resolve()),
                            "card_sha256": card.get(CARD_HASH), "weights_sha256": card.get(WEIGHTS_HASH),
                            "temperature": _finite(card.get("temperature"))})  # fmt: skip
    return {"name": metrics.get("model") or train.get("model"), "model_args": train.get("model_args") or {},
            "training": train, "task": metrics.get("task"), "classes": list(metrics.get("classes") or []),
            "folds": int(metrics.get("folds", len(checkpoints))), "checkpoints": checkpoints}  # fmt: skip


def _splits_section(cfg: dict[str, Any], metrics: dict[str, Any], run: Path) -> dict[str, Any]:
    spec = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
    return {"k": int(metrics.get("folds", spec.get("folds", 0))), "seed": spec.get("seed"),
            "group_column": spec.get("group_column"), "protocol": "stratified, patient-grouped k-fold; per fold one "
            "part tests, the next validates (early stopping, temperature), the rest train",
            "file": str((run / "splits.json").resolve()) if (run / "splits.json").exists() else None,
            "folds": [{"fold": int(r["fold"]), "n_train": int(r["n_train"]), "n_val": int(r["n_val"]),
                       "n_test": int(r["n_test"])} for r in metrics.get("per_fold", [])]}  # fmt: skip


def _performance_section(metrics: dict[str, Any]) -> dict[str, Any]:
    pooled = metrics.get("pooled") or {}
    out = {"evaluation": "pooled out-of-fold predictions of the cross-validation (each patient predicted once, by "
                         "the fold model that never trained on it); bootstrap 95% CIs",
           "patients": int(pooled.get("n", 0)),
           "pooled": {k: _ci(v) for k, v in (pooled.get("metrics") or {}).items()},
           "mean_over_folds": {k: {"mean": _finite(v.get("mean")), "sd": _finite(v.get("sd"))}
                               for k, v in (metrics.get("mean") or {}).items()},
           "per_class": {c: {k: _finite(x) for k, x in v.items()} for c, v in (pooled.get("per_class") or {}).items()},
           "confusion_matrix": pooled.get("confusion_matrix") or []}  # fmt: skip
    if isinstance(metrics.get("instance"), dict):
        out["instance"] = {k: _finite(v) if not isinstance(v, int) else v for k, v in metrics["instance"].items()}
    return out


def _calibration_section(metrics: dict[str, Any]) -> dict[str, Any]:
    pooled = (metrics.get("pooled") or {}).get("metrics") or {}
    folds = metrics.get("per_fold") or []
    before = [_finite(r.get("ece_uncalibrated")) for r in folds]
    before = [b for b in before if b is not None]
    return {"method": "temperature scaling fitted on each fold's validation patients",
            "temperatures": [_finite(r.get("temperature")) for r in folds],
            "ece": _ci(pooled.get("ece")),
            "ece_uncalibrated_mean_over_folds": float(np.mean(before)) if before else None,
            "reliability": (metrics.get("pooled") or {}).get("reliability")}  # fmt: skip


def _uncertainty_section(metrics: dict[str, Any]) -> dict[str, Any]:
    u = metrics.get("uncertainty")
    if not isinstance(u, dict):
        return {"status": "not computed", "scores": {}, "best": None, "skipped": {}}
    scores = {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in (u.get("scores") or {}).items()}
    return {"status": "computed", "evaluation": "out-of-fold predictions; patients ranked from most to least "
            "certain", "scale": u.get("scale"), "scores": scores, "best": u.get("best"),
            "skipped": dict(u.get("skipped") or {}), "mc_samples": int(u.get("mc_samples") or 0)}  # fmt: skip


def _same_run(named: Any, run: Path) -> bool:
    if not named:
        return True
    p = Path(str(named))
    try:
        return p.resolve() == run.resolve() or p.resolve().parent == run.resolve()
    except OSError:
        return False


def _subgroups_section(run: Path, audit: str | Path | None) -> dict[str, Any]:
    path = Path(audit) if audit is not None else run / DEFAULT_AUDIT
    if audit is not None and path.is_dir():
        path = path / "audit.json"
    if not path.exists():
        if audit is not None:
            raise UserError(f"{path}: no audit.json here")
        return {"status": "not audited", "source": None, "headline": None, "flagged_groups": [], "groups": []}
    data = _read_json(path, "audit")
    named = (data.get("input") or {}).get("run")
    if not _same_run(named, run):
        raise UserError(f"{path}: audits {named}, not {run}")
    groups = []
    for c in data.get("comparisons") or []:
        if c.get("family") == "primary":
            groups.append({"group": c.get("group"), "metric": c.get("metric"), "n": c.get("n_group"),
                           "value": _finite(c.get("value")), "gap": _finite(c.get("gap")),
                           "p_corrected": _finite(c.get("p_corrected")),
                           "flagged": bool(c.get("flagged"))})  # fmt: skip
    summary = data.get("summary") or {}
    return {"status": "audited", "source": str(path.resolve()), "headline": summary.get("headline"),
            "flagged_groups": list(summary.get("flagged_groups") or []), "groups": groups,
            "attributes": (data.get("attributes") or {}).get("audited"),
            "warnings": [w.get("message") for w in data.get("warnings") or [] if isinstance(w, dict)]}  # fmt: skip


def _flag_name(item: Any) -> str:
    if isinstance(item, dict):
        for key in ("name", "source", "feature", "check", "group"):
            if item.get(key):
                return str(item[key])
        return json.dumps(item, sort_keys=True, default=str)[:80]
    return str(item)


def _shortcuts_section(run: Path) -> dict[str, Any]:
    path = run / SHORTCUTS_FILE
    if not path.exists():
        return {"status": "not checked", "source": None, "flagged": [], "summary": None,
                "note": f"no {SHORTCUTS_FILE} in the run folder: run 'milcore audit shortcuts --run RUN' and "
                        "regenerate the passport (milcore passport RUN)"}  # fmt: skip
    data = _read_json(path, "shortcut check")
    flagged = data.get("flagged")
    if flagged is None:
        checks = data.get("checks") or data.get("results") or []
        flagged = [c for c in checks if isinstance(c, dict) and c.get("flagged")] if isinstance(checks, list) else []
    summary = data.get("summary") or data.get("headline")
    if isinstance(summary, dict):
        summary = summary.get("headline") or json.dumps(summary, default=str)[:300]
    return {"status": "checked", "source": str(path.resolve()), "flagged": [_flag_name(f) for f in flagged or []],
            "summary": summary, "skipped": data.get("skipped")}  # fmt: skip


def _concepts_section(run: Path) -> dict[str, Any]:
    path = run / "concepts.json"
    if path.exists():
        data = _read_json(path, "concept heads")
        return {"status": "available", "source": str(path.resolve()),
                "attributes": list(data.get("attributes") or data.get("heads") or []),
                "scores": data.get("scores") or data.get("metrics")}  # fmt: skip
    explain = run / "explain" / "explain.json"
    if explain.exists():
        try:
            data = json.loads(explain.read_text())
        except (OSError, ValueError):
            data = {}
        patients = data.get("patients") if isinstance(data, dict) else None
        with_attrs = [p for p in (patients or {}).values() if isinstance(p, dict) and p.get("attributes")]
        if with_attrs:
            return {"status": "available", "source": str(explain.resolve()), "attributes": [], "scores": None,
                    "patients_described": len(with_attrs)}  # fmt: skip
    return {"status": "not available", "source": None, "attributes": [], "scores": None}


def _software_section(cfg: dict[str, Any]) -> dict[str, Any]:
    from milcore.training.checkpoint import versions

    now = versions()
    from importlib.metadata import PackageNotFoundError, version

    for name in ("h5py", "scipy", "faiss-cpu", "jsonschema"):
        try:
            now[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"trained_with": dict(cfg.get("versions") or {}), "passport_written_with": now,
            "platform": platform.platform()}  # fmt: skip


def _limitations(passport: dict[str, Any], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Known limitations: the run's caveats first, then what its evaluation cannot show."""
    out = [{"code": str(w.get("code")), "severity": str(w.get("severity")), "message": str(w.get("message"))}
           for w in metrics.get("warnings") or [] if isinstance(w, dict)]  # fmt: skip

    def note(code: str, message: str, severity: str = "caution") -> None:
        out.append({"code": code, "severity": severity, "message": message})

    cohort = passport["data"]["cohort"]
    sites = cohort.get("sites")
    where = f" from {len(sites)} site(s)" if sites else ""
    note("internal_validation_only", f"Evaluated by {passport['splits']['k']}-fold cross-validation on one cohort "
         f"of {cohort['patients']} patients{where}; no external validation is recorded in this passport.")
    note("encoder_bound", f"Valid only for features of encoder '{passport['data']['encoder'].get('name')}' "
         f"(fingerprint {str(passport['data']['encoder'].get('fingerprint'))[:12]}); milcore refuses other banks.")
    if passport["subgroups"]["status"] != "audited":
        note("not_audited", "Performance by sex, age and site has not been audited (milcore audit --run RUN ...; "
             "then milcore passport RUN).")
    elif passport["subgroups"]["flagged_groups"]:
        note("subgroup_gap", "The audit flags significantly worse performance for: "
             + ", ".join(passport["subgroups"]["flagged_groups"]) + ".", "critical")
    if passport["shortcuts"]["status"] != "checked":
        note("shortcuts_not_checked", "Shortcuts (site, acquisition date, image size, colour, bag size) have not been "
             "checked: the model may use them instead of cell morphology.")
    elif passport["shortcuts"]["flagged"]:
        note("shortcut", "The shortcut check flags: " + ", ".join(passport["shortcuts"]["flagged"]) + " (predicts "
             "the label about as well as the model).", "critical")
    unc = passport["uncertainty"]
    if unc["status"] == "computed":
        note("referral_thresholds", "Referral thresholds and coverages were measured on the out-of-fold predictions "
             "of this cohort; on new patients the same threshold may refer a different share.")
        for name, why in unc["skipped"].items():
            note(f"uncertainty_{name}_skipped", f"Uncertainty score '{name}' not computed: {why}.", "info")
    return out


def _level(target: Any) -> str:
    """A balanced-accuracy level as written in tables: two decimals (0.90), more only when needed (0.975)."""
    t = float(target)
    return f"{t:.2f}" if round(t, 2) == t else f"{t:g}"


def _add_coverage_targets(section: dict[str, Any], run: Path, targets: tuple[float, ...]) -> None:
    """Add "the coverage at which balanced accuracy reaches X" for ``targets`` to every score of the uncertainty
    section, from the run's out-of-fold ``predictions.csv`` (its ``uncertainty_<score>`` columns, rounded to 1e-6)."""
    import csv

    from milcore.data.predictions import read_predictions
    from milcore.trust.uncertainty import risk_coverage

    if section.get("status") != "computed" or not targets:
        return
    table = read_predictions(run)
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name, entry in section["scores"].items():
        column = f"uncertainty_{name}"
        if not rows or column not in rows[0] or any(r[column] == "" for r in rows):
            continue
        curve = risk_coverage(table.labels, table.proba, np.asarray([float(r[column]) for r in rows]), name)
        reach = dict(entry.get("coverage_for_balanced_accuracy") or {})
        reach.update({f"{t:g}": curve.coverage_for(t) for t in targets})
        entry["coverage_for_balanced_accuracy"] = dict(sorted(reach.items(), key=lambda kv: float(kv[0])))


def build_passport(run: str | Path, *, bank: str | Path | None = None, audit: str | Path | None = None,
                   coverage_targets: Sequence[float] = ()) -> dict[str, Any]:  # fmt: skip
    """The passport of a finished training run folder (nothing is written).

    Args:
        run: the run folder (``config.yaml``, ``metrics.json``, fold checkpoints).
        bank: the bank the run was trained on, when it moved (default: the path in ``config.yaml``).
        audit: a subgroup audit folder or ``audit.json`` of this run (default: ``RUN/audit/audit.json`` if present).
        coverage_targets: balanced accuracies (each in ``(0, 1]``) whose coverage is added beside 0.90 and 0.95,
            from the out-of-fold predictions.

    Raises:
        UserError: not a finished run; a bank from another encoder (refused) or with other contents; an
            audit of another run.
    """
    from milcore.data.inputs import read_run_config
    from milcore.trust.uncertainty import TARGETS, check_coverage_targets

    targets = tuple(t for t in check_coverage_targets(coverage_targets) if t not in TARGETS)
    run = Path(run)
    cfg = read_run_config(run, "a passport describes a finished training run folder")
    if cfg is None:
        raise UserError(f"{run}: no config.yaml (a passport describes a training run folder)")
    metrics = _read_json(run / "metrics.json", "final metrics (is the run finished?)")
    inputs = cfg.get("inputs") if isinstance(cfg.get("inputs"), dict) else {}
    spec = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
    bank_path = bank or inputs.get("bank") or spec.get("bank")
    if not bank_path:
        raise UserError(f"{run}/config.yaml: names no bank; pass --bank")
    model = _model_section(cfg, metrics, run)
    passport: dict[str, Any] = {
        "format": PASSPORT_FORMAT, "format_version": PASSPORT_VERSION,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": str(run.resolve()),
        "model": model,
        "intended_use": {"statement": INTENDED_USE.format(task=model["task"], classes=", ".join(model["classes"])),
                         "users": "hematologists and laboratory physicians",
                         "output": "per-patient class probabilities (temperature-calibrated), an uncertainty score "
                                   "and a referral flag, per-cell attention, similar training cases",
                         "not_intended_for": list(NOT_INTENDED)},
        "data": _data_section(cfg, bank_path, run),
        "splits": _splits_section(cfg, metrics, run),
        "performance": _performance_section(metrics),
        "calibration": _calibration_section(metrics),
        "uncertainty": _uncertainty_section(metrics),
        "subgroups": _subgroups_section(run, audit),
        "shortcuts": _shortcuts_section(run),
        "concepts": _concepts_section(run),
        "software": _software_section(cfg),
    }  # fmt: skip
    _add_coverage_targets(passport["uncertainty"], run, targets)
    passport["limitations"] = _limitations(passport, metrics)
    from milcore.report.files import clean_json

    return clean_json(json.loads(json.dumps(passport, default=_json_default)))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# ----------------------------------------------------------------------------- schema
class PassportSchemaError(RuntimeError):
    """A passport that does not meet ``docs/passport.schema.json`` (a bug in milcore, not a user error)."""


def load_schema(path: str | Path | None = None) -> dict[str, Any] | None:
    """The passport JSON Schema (``None`` when the source tree's ``docs/`` is not installed)."""
    path = Path(path) if path is not None else SCHEMA_PATH
    if not path.exists():
        return None
    return json.loads(path.read_text())


def schema_errors(passport: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> list[str]:
    """Every violation of the schema, as ``path: message`` lines (empty when valid)."""
    import jsonschema

    schema = schema if schema is not None else load_schema()
    if schema is None:
        raise FileNotFoundError(f"{SCHEMA_PATH}: passport schema not found")
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(passport), key=lambda e: list(map(str, e.absolute_path)))]


def validate_passport(passport: Mapping[str, Any]) -> bool:
    """Check ``passport`` against the schema when the schema and ``jsonschema`` are available.

    Returns:
        Whether it was checked.

    Raises:
        PassportSchemaError: a violation (listing the first ones).
    """
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        return False
    schema = load_schema()
    if schema is None:
        return False
    errors = schema_errors(passport, schema)
    if errors:
        raise PassportSchemaError(f"passport does not meet {SCHEMA_PATH.name}: " + "; ".join(errors[:5]))
    return True


# ----------------------------------------------------------------------------- writing
def _fmt(x: Any, digits: int = 3) -> str:
    from milcore.report import fmt

    return "–" if x is None else fmt(x, digits)


#: What the abstention table of ``passport.md`` shows, for a reader without the glossary.
UNCERTAINTY_NOTE = (
    "Each score ranks the patients from most to least certain (0 = certain, 1 = maximally uncertain); referring "
    "the most uncertain ones for manual review raises the balanced accuracy (BA) of the patients kept. AURC is the "
    "mean error rate of the kept patients over all referral levels (lower is better); a random referral order gives "
    "the random AURC. 'keep for BA ≥ x': the most patients a threshold U can keep with that BA (patients with a "
    "score above U are referred). Measured on the out-of-fold predictions; the risk-coverage plot is in report.html."
)


def _reach(target: Mapping[str, Any] | None, n: int) -> str:
    """``"52 of 60 (refer 8; U ≤ 0.412)"`` or ``"not reached"``."""
    if not target:
        return "not reached"
    referred = int(target["referred"])
    return f"{n - referred} of {n} (refer {referred}; U ≤ {float(target['threshold']):.3g})"


def render_markdown(passport: Mapping[str, Any]) -> str:
    """``passport.md``: the passport for a reader."""
    from milcore.metrics import label
    from milcore.report import Report, fmt_ci

    p = passport
    m, d = p["model"], p["data"]
    rep = Report(f"Model passport — {m['name']} for {m['task']}")
    rep.paragraph(f"Run `{p['run']}`, written {p['generated']}. Machine-readable: passport.json "
                  f"(schema docs/passport.schema.json).")  # fmt: skip
    critical = [x["message"] for x in p["limitations"] if x["severity"] == "critical"]
    if critical:
        rep.warnings("Read before use", critical, critical=True)
    rep.heading("Intended use")
    rep.paragraph(p["intended_use"]["statement"])
    rep.paragraph("Users: " + p["intended_use"]["users"] + ". Output: " + p["intended_use"]["output"] + ".")
    rep.paragraph("Not intended for:")
    rep.bullets(p["intended_use"]["not_intended_for"])
    rep.heading("Model")
    rep.table(["field", "value"], [["aggregator", m["name"]], ["model options", json.dumps(m["model_args"])],
                                   ["classes", ", ".join(m["classes"])], ["folds (ensemble)", m["folds"]]]
              + [[f"fold {c['fold']} weights SHA-256", str(c["weights_sha256"])[:16] + "…"] for c in m["checkpoints"]])
    rep.heading("Data provenance")
    c, b, e = d["cohort"], d["bank"], d["encoder"]
    rows = [["cohort table", c["path"]], ["patients", c["patients"]],
            ["per class", ", ".join(f"{k}: {v}" for k, v in c["class_counts"].items())],
            ["labels fingerprint", c["labels_fingerprint"][:16] + "…"], ["bank", b["path"]],
            ["bank fingerprint", b["fingerprint"][:16] + "…"], ["cells", b["cells"]],
            ["cells per patient (min / median / max)", " / ".join(_fmt(b["cells_per_patient"][k], 0)
                                                                  for k in ("min", "median", "max"))],
            ["encoder", f"{e.get('name')} {e.get('version', '')} (dim {e.get('dim')})"],
            ["encoder fingerprint", str(e.get("fingerprint"))[:16] + "…"]]  # fmt: skip
    for key in ("sites", "sex"):
        if c.get(key):
            rows.append([key, ", ".join(f"{k}: {v}" for k, v in c[key].items())])
    if c.get("age"):
        rows.append(["age (min / median / max)", " / ".join(_fmt(c["age"][k], 0) for k in ("min", "median", "max"))])
    rep.table(["field", "value"], rows)
    s = p["splits"]
    rep.heading("Splits")
    rep.paragraph(f"{s['k']} folds, seed {s['seed']}, grouped by {s['group_column']}: {s['protocol']}.")
    rep.table(["fold", "train", "validation", "test"], [[f["fold"], f["n_train"], f["n_val"], f["n_test"]]
                                                        for f in s["folds"]])  # fmt: skip
    perf = p["performance"]
    rep.heading("Performance")
    rep.paragraph(f"{perf['evaluation']} ({perf['patients']} patients).")
    rows = []
    for k, v in perf["pooled"].items():
        mean = perf["mean_over_folds"].get(k, {})
        ci = v["ci95"] if None not in v["ci95"] else None
        rows.append([label(k), fmt_ci(v["value"], ci) if v["value"] is not None else "–",
                     f"{_fmt(mean.get('mean'))} ± {_fmt(mean.get('sd'))}" if mean else "–"])  # fmt: skip
    rep.table(["metric", "pooled [95% CI]", "mean ± sd over folds"], rows)
    cal = p["calibration"]
    rep.heading("Calibration")
    rep.paragraph(f"{cal['method']}; temperatures " + ", ".join(_fmt(t) for t in cal["temperatures"])
                  + f"; ECE {_fmt(cal['ece']['value'])} (before scaling, mean over folds: "
                  f"{_fmt(cal['ece_uncalibrated_mean_over_folds'])}).")  # fmt: skip
    unc = p["uncertainty"]
    rep.heading("Uncertainty and abstention")
    if unc["status"] == "computed" and unc["scores"]:
        rep.paragraph(UNCERTAINTY_NOTE)
        targets = list(dict.fromkeys(t for v in unc["scores"].values() for t in v["coverage_for_balanced_accuracy"]))
        rows = []
        for name, v in unc["scores"].items():
            at = v["at_coverage"]
            rows.append([name + (" (best)" if name == unc["best"] else ""), _fmt(v["aurc"]), _fmt(v["random_aurc"]),
                         _fmt(at.get("1", {}).get("balanced_accuracy")),
                         _fmt(at.get("0.8", {}).get("balanced_accuracy"))]
                        + [_reach(v["coverage_for_balanced_accuracy"].get(t), v["n"]) for t in targets])  # fmt: skip
        rep.table(["score", "AURC", "random AURC", "BA all", "BA at 80% coverage"]
                  + [f"keep for BA ≥ {_level(t)}" for t in targets], rows)  # fmt: skip
        for name, why in unc["skipped"].items():
            rep.paragraph(f"{name}: not computed ({why}).", css="muted")
    else:
        rep.paragraph("Not computed.")
    sub = p["subgroups"]
    rep.heading("Subgroups")
    if sub["status"] == "audited":
        rep.paragraph(str(sub["headline"] or "") + f" (source: {sub['source']})")
        if sub["groups"]:
            rep.table(["group", "n", "value", "gap vs rest", "corrected p", "flagged"],
                      [[g["group"], g["n"], _fmt(g["value"]), _fmt(g["gap"]), _fmt(g["p_corrected"]),
                        "yes" if g["flagged"] else "no"] for g in sub["groups"]])  # fmt: skip
    else:
        rep.paragraph("Not audited.")
    sc = p["shortcuts"]
    rep.heading("Shortcuts")
    if sc["status"] == "checked":
        rep.paragraph((sc["summary"] or "") + (" Flagged: " + ", ".join(sc["flagged"]) if sc["flagged"]
                                               else " Nothing flagged.") + f" (source: {sc['source']})")  # fmt: skip
    else:
        rep.paragraph("Not checked. " + sc.get("note", ""))
    co = p["concepts"]
    rep.heading("Morphological concepts")
    rep.paragraph(f"{co['status'].capitalize()}" + (f" (source: {co['source']})" if co.get("source") else "") + ".")
    rep.heading("Software")
    sw = p["software"]
    rep.table(["package", "trained with", "passport written with"],
              [[k, sw["trained_with"].get(k, "–"), sw["passport_written_with"].get(k, "–")]
               for k in dict.fromkeys([*sw["trained_with"], *sw["passport_written_with"]])])  # fmt: skip
    rep.heading("Known limitations")
    rep.bullets([f"[{x['severity']}] {x['message']}" for x in p["limitations"]])
    text, _ = rep.to_markdown()
    return text


def write_passport(run: str | Path, passport: Mapping[str, Any]) -> tuple[Path, Path]:
    """Validate ``passport`` (when the schema is available) and write ``passport.json`` and ``passport.md``.

    Raises:
        PassportSchemaError: the passport does not meet its schema (nothing is written).
    """
    from milcore.report.files import write_json_atomic

    run = Path(run)
    validate_passport(passport)
    md = render_markdown(passport)
    write_json_atomic(run / PASSPORT_JSON, dict(passport))
    tmp = run / (PASSPORT_MD + ".tmp")
    tmp.write_text(md)
    tmp.replace(run / PASSPORT_MD)
    return run / PASSPORT_JSON, run / PASSPORT_MD


def passport_run(run: str | Path, *, bank: str | Path | None = None, audit: str | Path | None = None,
                 coverage_targets: Sequence[float] = ()) -> dict[str, Any]:  # fmt: skip
    """Build and write the passport of a run folder (``milcore passport``); returns its content."""
    passport = build_passport(run, bank=bank, audit=audit, coverage_targets=coverage_targets)
    json_path, _ = write_passport(run, passport)
    log.info("model passport: %s (and passport.md)", json_path)
    return passport
