"""A training run: patient-level k-fold cross-validation from a bank and a cohort table into a run folder.

``RUN/`` holds ``config.yaml`` (resolved), ``splits.json``, ``metrics.json`` (per-fold and mean values,
pooled out-of-fold metrics with bootstrap CIs), ``predictions.csv`` + ``attention.h5`` (out-of-fold,
aligned with the bank rows), ``fold_K/`` (checkpoint in safetensors + card, history), and
``report.html`` / ``report.md``. An interrupted run resumes with ``resume=True``: finished folds are
reloaded, the fold in flight continues from its last epoch, after the stored configuration and the
fingerprints of the bank and the labels were compared with the new ones (any difference is refused).
Every input is checked before the folder is created: a run that fails its checks leaves nothing.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from feature_cache.errors import InvalidArgumentError, OutputExistsError, UserError
from milcore.training.config import RunSpec, TrainConfig

if TYPE_CHECKING:
    from milcore.data.inputs import RunInputs
    from milcore.data.splits import Fold

log = logging.getLogger(__name__)

HEADLINE = ("balanced_accuracy", "macro_f1", "auroc", "ece")


def _write_history(folder: Path, history: list[dict[str, float]]) -> None:
    (folder / "history.json").write_text(json.dumps(history, indent=1))
    if history:
        with open(folder / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)


#: Training options that may change on ``--resume``: where and how fast a run computes, not what it learns.
RESUMABLE_CHANGES = ("device", "num_workers", "memory_budget_gb", "tensorboard")

#: ``RunSpec`` fields that decide the folds and the labels (paths are compared through fingerprints).
RESUME_KEYS = ("task", "folds", "seed", "group_column")


def _check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse an unusable ``out`` without creating or deleting anything."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise OutputExistsError(f"{out}: exists and is not empty (pass --resume to continue it or --overwrite)")


def check_model(config: TrainConfig, in_dim: int, num_classes: int) -> None:
    """Build the configured aggregator once (on the CPU) so that a bad name or ``--model-arg`` fails up front.

    Raises:
        InvalidArgumentError: unknown aggregator or config field, or a value the aggregator refuses.
        UserError: an optional dependency of the aggregator is missing; TensorBoard asked for but absent.
    """
    from milcore.models import create_aggregator, get_aggregator_entry

    get_aggregator_entry(config.model)  # an unknown name, with close matches
    where = (f"--model-arg for {config.model!r} ({', '.join(f'{k}={v!r}' for k, v in config.model_args.items())})"
             if config.model_args else f"model {config.model!r}")  # fmt: skip
    try:
        create_aggregator(config.model, in_dim=in_dim, num_classes=num_classes, **config.model_args)
    except ImportError as exc:
        raise UserError(f"model {config.model!r} needs a package that is not installed ({exc})") from exc
    except UserError as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    except (TypeError, ValueError, AssertionError) as exc:
        raise InvalidArgumentError(f"{where}: {exc}") from exc
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as exc:
            raise UserError("TensorBoard logging needs the tensorboard package (pip install tensorboard)") from exc


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)


def check_resume(out: Path, recorded: dict[str, Any], resolved: dict[str, Any]) -> None:
    """Refuse to resume ``out`` with other inputs or options than it was trained with, naming each difference.

    Compares the task, folds, seed and grouping, every training option except :data:`RESUMABLE_CHANGES`,
    the classes, and the fingerprints of the bank (encoder, bag ids and sizes, sampled features) and of the
    labels (a moved file with the same content is fine; the same path with new content is not).

    Raises:
        UserError: ``--resume: RUN was trained with k=v, ...; now k=w, ...``.
    """
    was: list[str] = []
    now: list[str] = []

    def differ(key: str, old: Any, new: Any) -> None:
        was.append(f"{key}={_show(old)}")
        now.append(f"{key}={_show(new)}")

    old_run, new_run = recorded.get("run") or {}, resolved["run"]
    for key in RESUME_KEYS:
        if old_run.get(key) != new_run[key]:
            differ(key, old_run.get(key), new_run[key])
    defaults = TrainConfig().to_dict()
    old_train = recorded.get("train") or {}
    for key, value in resolved["train"].items():
        if key not in RESUMABLE_CHANGES and old_train.get(key, defaults.get(key)) != value:
            differ(key, old_train.get(key, defaults.get(key)), value)
    old_in, new_in = recorded.get("inputs"), resolved["inputs"]
    for name, fp in (("bank", "bank_fingerprint"), ("cohort", "labels_fingerprint")):
        old_path, new_path = old_run.get(name), new_run[name]
        if isinstance(old_in, dict) and fp in old_in:
            if old_in[fp] != new_in[fp]:
                same = old_in.get(name) == new_in[name]
                differ(name, old_path, f"{new_path} ({'its contents changed' if same else 'other contents'})")
            elif old_in.get(name) != new_in[name]:
                log.info("--resume: %s moved (%s -> %s); same contents", name, old_in.get(name), new_in[name])
        elif old_path is not None and Path(str(old_path)).resolve() != Path(new_path).resolve():
            differ(name, old_path, new_path)  # a run recorded before fingerprints: paths only
    old_enc = (recorded.get("encoder") or {}).get("fingerprint")
    if old_enc is not None and old_enc != resolved["encoder"]["fingerprint"]:
        differ("encoder", (recorded.get("encoder") or {}).get("name"), resolved["encoder"]["name"])
    if recorded.get("classes") is not None and recorded.get("classes") != resolved["classes"]:
        differ("classes", recorded.get("classes"), resolved["classes"])
    if was:
        raise UserError(f"--resume: {out} was trained with {', '.join(was)}; now {', '.join(now)} (resume with the "
                        "same inputs and options, or start a new --out)")  # fmt: skip
    if not isinstance(old_in, dict):
        log.warning("--resume: %s was recorded without input fingerprints; only paths and options were compared", out)
    changed = [k for k in RESUMABLE_CHANGES if old_train.get(k, defaults.get(k)) != resolved["train"][k]]
    if changed:
        log.info("--resume: %s changed (allowed: they do not change what is learnt)", ", ".join(changed))


def _read_record(out: Path) -> dict[str, Any] | None:
    import yaml

    path = out / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}); cannot check what --resume would "
                        "continue") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a run configuration; cannot check what --resume would continue")
    return data


def _has_progress(out: Path) -> bool:
    """Whether ``out`` holds anything a ``--resume`` would continue (a fold's checkpoint or training state)."""
    return any(out.glob("fold_*/checkpoint.json")) or any(out.glob("fold_*/train_state.pt"))


@dataclass
class _Plan:
    """Everything checked before the run folder is touched."""

    inputs: RunInputs
    folds: list[Fold]
    resolved: dict[str, Any]
    record: bool
    truth: dict[str, np.ndarray] | None
    resume: bool


def _plan(spec: RunSpec, config: TrainConfig, out: Path, overwrite: bool, resume: bool) -> _Plan:
    """Check the device, the output folder, bank, cohort, task, folds, model, options and (on resume) the
    stored configuration; nothing is created or deleted."""
    from feature_cache.devices import resolve_device
    from milcore.data.inputs import bank_fingerprint, labels_fingerprint, load_inputs
    from milcore.data.splits import load_folds, make_folds
    from milcore.training.checkpoint import versions

    resolve_device(config.device)
    _check_out(out, overwrite, resume)
    inputs = load_inputs(spec.bank, spec.cohort, spec.task, folds=spec.folds, group_column=spec.group_column)
    bank, cohort, join = inputs.bank, inputs.cohort, inputs.join
    log.info("%s: %s", spec.cohort, join.summary())
    classes = inputs.classes
    for name, n in cohort.class_counts().items():
        if n == 0:
            log.warning("class %r has no bag in the bank; it is kept in the head but never trained", name)
    check_model(config, bank.dim, len(classes))
    if spec.cells is not None and not Path(spec.cells).is_file():
        raise UserError(f"{spec.cells}: instance ground-truth table (--cells) not found")
    resolved = {"run": asdict(spec), "train": config.to_dict(), "classes": classes, "encoder": bank.info.to_dict(),
                "inputs": {"bank": str(Path(spec.bank).resolve()), "cohort": str(Path(spec.cohort).resolve()),
                           "bank_fingerprint": bank_fingerprint(bank, list(cohort.bag_ids)),
                           "labels_fingerprint": labels_fingerprint(cohort)},
                "versions": versions(), "join": {"matched": len(join.matched),
                "only_in_cohort": len(join.only_in_cohort), "only_in_bank": len(join.only_in_bank),
                "missing_labels": cohort.missing_labels}}  # fmt: skip
    resolved = json.loads(json.dumps(resolved, default=str))  # what config.yaml holds, to compare like with like
    recorded = _read_record(out) if resume else None
    if recorded is not None:
        check_resume(out, recorded, resolved)
    elif resume and out.is_dir() and _has_progress(out):
        raise UserError(f"--resume: {out} has fold results but no config.yaml; cannot check they match these inputs")
    splits = out / "splits.json"
    if resume and splits.exists():
        folds = load_folds(splits)
        used = {b for f in folds for b in (*f.train, *f.val, *f.test)}
        if used != set(cohort.bag_ids) or len(folds) != spec.folds:
            raise UserError(f"--resume: {splits} splits {len(used)} bags into {len(folds)} folds; this cohort has "
                            f"{len(cohort)} bags and --folds {spec.folds}")  # fmt: skip
    else:
        folds = make_folds(list(cohort.bag_ids), cohort.labels, k=spec.folds, seed=spec.seed, groups=cohort.groups,
                           classes=classes)  # fmt: skip
    truth = None
    cells = Path(spec.cells) if spec.cells else Path(spec.cohort).with_name("cells.csv")
    if cells.is_file() and "cell_id" in bank.columns:
        from milcore.data.ground_truth import load_cell_truth

        truth = load_cell_truth(cells, bank, list(cohort.bag_ids))
    return _Plan(inputs, folds, resolved, recorded is None, truth, resume)


def train_cv(spec: RunSpec, config: TrainConfig, out: str | Path, *, overwrite: bool = False,
             resume: bool = False) -> dict[str, Any]:  # fmt: skip
    """Cross-validate ``config`` on ``spec`` and write the run folder; returns ``metrics.json``'s content.

    Every input (device, bank, cohort, task, folds, model and its options, the output folder, and on
    ``resume`` the stored configuration) is checked before the folder is created or, with ``overwrite``,
    emptied. A run that fails before any fold has saved a checkpoint or a training state leaves no folder.

    Raises:
        UserError: a bad input, an occupied ``out``, or a ``resume`` with other inputs or options.
    """
    t_start = time.perf_counter()
    out = Path(out)
    plan = _plan(spec, config, out, overwrite, resume)
    if overwrite and not resume and out.is_dir():
        shutil.rmtree(out)
    created = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(spec, config, out, plan, t_start)
    except Exception:
        if created and not _has_progress(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(spec: RunSpec, config: TrainConfig, out: Path, plan: _Plan, t_start: float) -> dict[str, Any]:
    import yaml

    from milcore.data.splits import save_folds
    from milcore.metrics import aggregate_folds, scalar_metrics
    from milcore.metrics.calibration import fit_temperature, softmax
    from milcore.metrics.classification import expected_calibration_error
    from milcore.predict import PredictionTable, write_attention, write_predictions
    from milcore.report.evaluation import evaluate
    from milcore.training.checkpoint import load_checkpoint, save_checkpoint
    from milcore.training.features import FeatureStore
    from milcore.training.trainer import Trainer

    bank, cohort, folds, classes = plan.inputs.bank, plan.inputs.cohort, plan.folds, plan.inputs.classes
    if plan.record:
        (out / "config.yaml").write_text(yaml.safe_dump(plan.resolved, sort_keys=False))
    if not (out / "splits.json").exists():
        save_folds(folds, out / "splits.json", {"seed": spec.seed, "k": spec.folds, "cohort": spec.cohort})
    label_of = dict(zip(cohort.bag_ids, cohort.labels, strict=True))
    from milcore.models import aggregator_needs

    needs_coords = aggregator_needs(config.model).coords
    budget = int(config.memory_budget_gb * (1 << 30))
    store = FeatureStore(bank, list(cohort.bag_ids), budget, with_coords=needs_coords)
    trainer = Trainer(config, bank.dim, len(classes))
    oof_proba: dict[str, np.ndarray] = {}
    oof_fold: dict[str, int] = {}
    oof_att: dict[str, np.ndarray] = {}
    per_fold = []
    for fold in folds:
        fdir = out / f"fold_{fold.index}"
        fdir.mkdir(exist_ok=True)
        tr, va, te = store.view(fold.train), store.view(fold.val), store.view(fold.test)
        y_tr = np.asarray([label_of[b] for b in fold.train])
        y_va = np.asarray([label_of[b] for b in fold.val])
        y_te = np.asarray([label_of[b] for b in fold.test])
        if plan.resume and (fdir / "checkpoint.json").exists():
            model, card = load_checkpoint(fdir, trainer.device)
            temperature, best_epoch = float(card["temperature"]), int(card.get("best_epoch", -1))
            history = json.loads((fdir / "history.json").read_text()) if (fdir / "history.json").exists() else []
            log.info("fold %d: reusing its checkpoint", fold.index)
        else:
            model, fit = trainer.fit(tr, y_tr, va, y_va, state_path=fdir / "train_state.pt",
                                     log_dir=fdir / "tensorboard", desc=f"fold {fold.index + 1}/{len(folds)}")
            val_logits = trainer.predict(model, va, with_attention=False).logits
            temperature = fit_temperature(val_logits, y_va)
            best_epoch, history = fit.best_epoch, fit.history
            save_checkpoint(fdir, model, classes=classes, encoder=bank.info.to_dict(), temperature=temperature,
                            task=spec.task, train_config=config.to_dict(), split={"fold": fold.index,
                            "train": list(fold.train), "val": list(fold.val), "test": list(fold.test)},
                            extra={"best_epoch": best_epoch})  # fmt: skip
            _write_history(fdir, history)
            (fdir / "train_state.pt").unlink(missing_ok=True)
        preds = trainer.predict(model, te)
        proba = softmax(preds.logits, temperature)
        row = {"fold": fold.index, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
               "best_epoch": best_epoch, "epochs_run": len(history), "temperature": temperature,
               **scalar_metrics(y_te, proba), "ece_uncalibrated": expected_calibration_error(
                   y_te, softmax(preds.logits))}  # fmt: skip
        per_fold.append(row)
        log.info("fold %d: balanced accuracy %.3f, AUROC %.3f (best epoch %d)", fold.index,
                 row["balanced_accuracy"], row["auroc"], best_epoch)  # fmt: skip
        for j, b in enumerate(fold.test):
            oof_proba[b], oof_fold[b] = proba[j], fold.index
            a = preds.attention[j]
            oof_att[b] = a if a.ndim == 1 else a.mean(axis=1)
    ids = [b for b in cohort.bag_ids if b in oof_proba]
    y_all = np.asarray([label_of[b] for b in ids])
    p_all = np.stack([oof_proba[b] for b in ids])
    table = PredictionTable(ids, classes, p_all, y_all, np.asarray([oof_fold[b] for b in ids]))
    write_predictions(out, table)
    write_attention(out, ids, [oof_att[b] for b in ids], {"bank": spec.bank, "kind": "out-of-fold"})
    pooled = evaluate(y_all, p_all, classes, n_boot=spec.n_boot, seed=spec.seed)
    metrics: dict[str, Any] = {
        "task": spec.task, "model": config.model, "classes": classes, "folds": len(folds), "seed": config.seed,
        "per_fold": per_fold,
        "mean": aggregate_folds([{k: r[k] for k in (*HEADLINE, "accuracy", "ece_uncalibrated")} for r in per_fold]),
        "pooled": pooled,
    }  # fmt: skip
    for k in HEADLINE:
        metrics[k] = metrics["mean"][k]["mean"]
    if plan.truth is not None:
        from milcore.metrics.classification import instance_auroc

        truth = {b: plan.truth[b] for b in ids}
        metrics["instance"] = instance_auroc(oof_att, truth)
        for row in per_fold:
            fold_ids = [b for b in ids if oof_fold[b] == row["fold"]]
            row["instance_auroc"] = instance_auroc(oof_att, {b: truth[b] for b in fold_ids})["instance_auroc"]
        metrics["mean"]["instance_auroc"] = aggregate_folds([{"instance_auroc": r["instance_auroc"]}
                                                             for r in per_fold])["instance_auroc"]  # fmt: skip
    from milcore.training.report import run_warnings, write_run_report

    metrics["warnings"] = run_warnings(metrics)  # chance, temperature at a bound, too few patients (report.py)
    metrics["seconds"] = time.perf_counter() - t_start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_run_report(out, metrics, table, history_of={f.index: out / f"fold_{f.index}" for f in folds})
    return metrics
