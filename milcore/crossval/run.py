"""Patient-level k-fold cross-validation of one configuration, in memory or into a run folder.

:func:`cross_validate` trains one :func:`~milcore.training.fold.fit_fold` per fold on labelled bags
(:func:`milcore.data.store.open_bags`) and returns a :class:`~milcore.crossval.result.CVResult`. With
``out`` it also writes the run folder that ``milcore train`` writes (:func:`train_run` is the same from
paths): ``config.yaml`` (resolved), ``splits.json``, ``metrics.json`` (per-fold and mean values, pooled
out-of-fold metrics with bootstrap CIs, uncertainty), ``predictions.csv`` (with the uncertainty scores) +
``attention.h5`` (out-of-fold, aligned with the bank rows), ``fold_K/`` (checkpoint in safetensors + card,
history), ``report.html`` / ``report.md`` and the model passport (``passport.json`` / ``passport.md``,
:mod:`milcore.trust.passport`). An interrupted run resumes with ``resume=True``: finished folds are
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from feature_cache.errors import InvalidArgumentError, OutputExistsError, UserError
from milcore.crossval.result import CVResult, pool_folds
from milcore.crossval.resume import check_resume, has_progress, read_record
from milcore.training.config import RunSpec, TrainConfig

if TYPE_CHECKING:
    from milcore.data.splits import Fold
    from milcore.data.store import FeatureStore
    from milcore.training.trainer import ModelFactory

log = logging.getLogger(__name__)


def _write_history(folder: Path, history: list[dict[str, float]]) -> None:
    (folder / "history.json").write_text(json.dumps(history, indent=1))
    if history:
        with open(folder / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)


def _check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse an unusable ``out`` without creating or deleting anything."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise OutputExistsError(f"{out}: exists and is not empty (pass --resume to continue it or --overwrite)")


@dataclass
class _Plan:
    """Everything checked before anything is trained or the run folder is touched."""

    data: FeatureStore
    folds: list[Fold]
    resolved: dict[str, Any] | None
    record: bool
    truth: dict[str, np.ndarray] | None
    resume: bool


def _plan(spec: RunSpec, config: TrainConfig, out: Path | None, *, overwrite: bool = False, resume: bool = False,
          data: FeatureStore | None = None, folds: Sequence[Fold] | None = None,
          model: Any = None) -> _Plan:  # fmt: skip
    """Check the device, the output folder, bank, cohort, task, folds, model, options and (on resume) the
    stored configuration; nothing is created, deleted or trained. Features are not read."""
    from feature_cache.devices import resolve_device
    from milcore.data.cohort import join_bank
    from milcore.data.inputs import bank_fingerprint, check_trainable, labels_fingerprint, load_inputs
    from milcore.data.splits import load_folds, make_folds
    from milcore.data.store import FeatureStore
    from milcore.training.checkpoint import versions
    from milcore.training.trainer import check_model

    resolve_device(config.device)
    if out is not None:
        _check_out(out, overwrite, resume)
    if data is None:
        inputs = load_inputs(spec.bank, spec.cohort, spec.task, folds=spec.folds, group_column=spec.group_column)
        bank, cohort, join = inputs.bank, inputs.cohort, inputs.join
        log.info("%s: %s", spec.cohort, join.summary())
        from milcore.models import aggregator_needs

        needs_coords = model is None and aggregator_needs(config.model).coords
        budget = int(config.memory_budget_gb * (1 << 30))
        data = FeatureStore(bank, list(cohort.bag_ids), budget, needs_coords, labels=cohort.labels,
                            groups=cohort.groups, classes=cohort.classes, cohort=cohort)  # fmt: skip
    else:
        data.require_labels("cross-validation")
        from milcore.models import aggregator_needs

        if model is None and aggregator_needs(config.model).coords:
            data = data.with_coordinates()  # once for every fold, as milcore train does
        bank, cohort, join = data.bank, None, None
        if data.cohort is not None:
            cohort = data.cohort.subset(data.bag_ids)
            if folds is None:
                check_trainable(cohort, spec.bank, spec.folds)
            if out is not None:
                _, join = join_bank(cohort, bank.bag_ids(), sizes=bank.bag_sizes())
        elif out is not None:
            raise UserError("a run folder records the bags' cohort table: build the data with open_bags(bank, "
                            "cohort, task), or cross-validate without out=")  # fmt: skip
    classes = list(data.classes or [])
    if cohort is not None:
        for name, n in cohort.class_counts().items():
            if n == 0:
                log.warning("class %r has no bag in the bank; it is kept in the head but never trained", name)
    if model is None:
        check_model(config, bank.dim, len(classes))
    elif out is not None:
        raise InvalidArgumentError("a run folder stores registered aggregators (its checkpoints are rebuilt by "
                                   "name): register the module, or cross-validate it without out=")  # fmt: skip
    if spec.cells is not None and not Path(spec.cells).is_file():
        raise UserError(f"{spec.cells}: instance ground-truth table (--cells) not found")
    resolved, recorded = None, None
    if out is not None:
        assert cohort is not None and join is not None
        resolved = {"run": spec.to_dict(), "train": config.to_dict(), "classes": classes,
                    "encoder": bank.info.to_dict(),
                    "inputs": {"bank": str(Path(spec.bank).resolve()), "cohort": str(Path(spec.cohort).resolve()),
                               "bank_fingerprint": bank_fingerprint(bank, list(cohort.bag_ids)),
                               "labels_fingerprint": labels_fingerprint(cohort)},
                    "versions": versions(), "join": {"matched": len(join.matched),
                    "only_in_cohort": len(join.only_in_cohort), "only_in_bank": len(join.only_in_bank),
                    "missing_labels": cohort.missing_labels}}  # fmt: skip
        resolved = json.loads(json.dumps(resolved, default=str))  # what config.yaml holds, to compare like with like
        recorded = read_record(out) if resume else None
        if recorded is not None:
            check_resume(out, recorded, resolved)
        elif resume and out.is_dir() and has_progress(out):
            raise UserError(f"--resume: {out} has fold results but no config.yaml; cannot check they match these "
                            "inputs")  # fmt: skip
    splits = out / "splits.json" if out is not None else None
    if folds is not None:
        folds = list(folds)
        missing = {b for f in folds for b in (*f.train, *f.val, *f.test)} - set(data.bag_ids)
        if missing:
            raise UserError(f"the folds name {len(missing)} bag(s) the data lacks (e.g. "
                            f"{', '.join(sorted(missing)[:3])})")  # fmt: skip
    elif resume and splits is not None and splits.exists():
        folds = load_folds(splits)
        used = {b for f in folds for b in (*f.train, *f.val, *f.test)}
        if used != set(data.bag_ids) or len(folds) != spec.folds:
            raise UserError(f"--resume: {splits} splits {len(used)} bags into {len(folds)} folds; this cohort has "
                            f"{len(data)} bags and --folds {spec.folds}")  # fmt: skip
    else:
        folds = make_folds(list(data.bag_ids), data.labels, k=spec.folds, seed=spec.seed, groups=data.groups,
                           classes=classes)  # fmt: skip
    truth = None
    cells = Path(spec.cells) if spec.cells else (Path(spec.cohort).with_name("cells.csv") if spec.cohort else None)
    if cells is not None and cells.is_file() and "cell_id" in bank.columns:
        from milcore.data.ground_truth import load_cell_truth

        truth = load_cell_truth(cells, bank, list(data.bag_ids))
    return _Plan(data, folds, resolved, recorded is None, truth, resume)


def _spec_of(data: FeatureStore, folds: int | Sequence[Fold], seed: int, n_boot: int,
             cells: str | Path | None) -> RunSpec:  # fmt: skip
    """The :class:`RunSpec` describing ``data`` (its bank and cohort paths, task and patient grouping)."""
    cohort = data.cohort
    k = folds if isinstance(folds, int) else len(folds)
    return RunSpec(bank=str(getattr(data.bank, "path", "")), cohort=str(cohort.path) if cohort else "",
                   task=cohort.label_column if cohort else "", folds=k, seed=seed,
                   cells=None if cells is None else str(cells),
                   group_column=(cohort.group_column if cohort and cohort.group_column else "patient"),
                   n_boot=n_boot)  # fmt: skip


def cross_validate(config: TrainConfig, data: FeatureStore, folds: int | Sequence[Fold] = 5, *, seed: int = 0,
                   n_boot: int = 1000, cells: str | Path | None = None, model: ModelFactory | None = None,
                   out: str | Path | None = None, overwrite: bool = False,
                   resume: bool = False) -> CVResult:  # fmt: skip
    """Cross-validate ``config`` on labelled bags: one :func:`~milcore.training.fold.fit_fold` per fold.

    Args:
        config: how to train (``config.model``: the registered aggregator, unless ``model`` is given).
        data: labelled bags (:func:`milcore.data.store.open_bags`).
        folds: number of stratified, patient-grouped folds (made with ``seed``), or the folds themselves.
        seed: the split seed (the training seed is ``config.seed``).
        n_boot: bootstrap resamples of the pooled confidence intervals.
        cells: instance ground truth (default: ``cells.csv`` beside the cohort table, if present).
        model: a factory ``(in_dim, num_classes) -> nn.Module`` to train instead of ``config.model`` (called
            once per fold after seeding); its forward must return a :class:`~milcore.models.MILOutput`.
        out: also write the run folder (as ``milcore train`` does); ``None`` writes nothing.
        overwrite: replace a non-empty ``out``.
        resume: continue an interrupted run in ``out`` (same inputs and options only).

    Returns:
        The :class:`CVResult` (fold models, temperatures, out-of-fold predictions and attention, metrics).

    Raises:
        UserError: unlabelled bags, too few patients per class, an occupied ``out``, a refused resume.
        InvalidArgumentError: an unknown model or option; a module that breaks the MILOutput contract.
    """
    spec = _spec_of(data, folds, seed, n_boot, cells)
    given = None if isinstance(folds, int) else folds
    return _execute(spec, config, None if out is None else Path(out), overwrite=overwrite, resume=resume, data=data,
                    folds=given, model=model)  # fmt: skip


def train_run(spec: RunSpec, config: TrainConfig, out: str | Path, *, overwrite: bool = False,
              resume: bool = False) -> CVResult:  # fmt: skip
    """``milcore train``: cross-validate ``config`` on the bank and cohort of ``spec`` into the run folder ``out``.

    Every input (device, bank, cohort, task, folds, model and its options, the output folder, and on
    ``resume`` the stored configuration) is checked before the folder is created or, with ``overwrite``,
    emptied. A run that fails before any fold has saved a checkpoint or a training state leaves no folder.

    Raises:
        UserError: a bad input, an occupied ``out``, or a ``resume`` with other inputs or options.
    """
    return _execute(spec, config, Path(out), overwrite=overwrite, resume=resume)


def train_fold_run(spec: RunSpec, config: TrainConfig, out: str | Path, fold: int, *, overwrite: bool = False,
                   resume: bool = False) -> Any:  # fmt: skip
    """``milcore train --fold K``: one fold of the cross-validation of ``spec`` into its own run folder ``out``.

    The folds are made exactly as the whole run makes them (same ``spec.seed``), so ``k`` such runs (a job
    array, one fold each) joined by :func:`milcore.crossval.merge.merge_runs` (``milcore report merge``) give
    the run folder of the single-process run. ``out`` holds ``config.yaml`` (with ``fold: K``),
    ``splits.json`` and ``fold_K/`` (checkpoint, history, ``metrics.json`` of the fold's test part).

    Returns:
        The fold's :class:`~milcore.training.fold.FoldResult`.

    Raises:
        InvalidArgumentError: ``fold`` outside ``0 .. spec.folds - 1`` (before anything is read or written).
        UserError: as :func:`train_run`.
    """
    from milcore.training.fold import fit_fold

    if not 0 <= fold < spec.folds:
        raise InvalidArgumentError(f"--fold {fold}: out of range, --folds {spec.folds} has folds 0 to "
                                   f"{spec.folds - 1}")  # fmt: skip
    from feature_cache.distributed import detect_rank

    out = Path(out)
    rank = detect_rank()
    if rank.distributed:  # torchrun: DDP over the ranks, rank 0 writes
        if resume:
            raise InvalidArgumentError("--resume: a fold trained under torchrun restarts (drop --resume, add "
                                       "--overwrite); resuming is single-process only")  # fmt: skip
        return _train_fold_ddp(spec, config, out, fold, rank, overwrite=overwrite)
    plan = _plan(spec, config, out, overwrite=overwrite, resume=resume)
    assert plan.resolved is not None
    plan.resolved["fold"] = fold
    recorded = read_record(out) if resume else None
    if recorded is not None and recorded.get("fold") != fold:
        raise UserError(f"--resume: {out} holds fold {recorded.get('fold')}, not --fold {fold}")
    if overwrite and not resume and out.is_dir():
        shutil.rmtree(out)
    created = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    try:
        _start_folder(spec, out, plan)
        chosen = plan.folds[fold]
        fdir = out / f"fold_{fold}"
        fdir.mkdir(exist_ok=True)
        if resume and (fdir / "checkpoint.json").exists():
            result = _reload_fold(fdir, config, plan.data, chosen)
        else:
            result = fit_fold(config, plan.data, chosen, desc=f"fold {fold + 1}/{len(plan.folds)}",
                              state_path=fdir / "train_state.pt", log_dir=fdir / "tensorboard")  # fmt: skip
            _save_fold(fdir, result, spec, config, plan.data)
    except Exception:
        if created and not has_progress(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    (fdir / "metrics.json").write_text(json.dumps(result.row(), indent=2, default=float))
    return result


def _train_fold_ddp(spec: RunSpec, config: TrainConfig, out: Path, fold: int, rank: Any, *,
                    overwrite: bool = False) -> Any:  # fmt: skip
    """One fold trained by every torchrun rank with DDP (:func:`milcore.training.distributed.fit_fold_ddp`);
    rank 0 writes the one-fold run folder. Every rank checks the inputs before any writes."""
    from feature_cache.devices import resolve_device
    from feature_cache.distributed import backend_for, process_group
    from milcore.training.distributed import fit_fold_ddp

    with process_group(backend_for(resolve_device(config.device)), rank.local_rank) as dist:  # left before exit
        plan = _plan(spec, config, out, overwrite=overwrite)
        assert plan.resolved is not None
        plan.resolved["fold"] = fold
        plan.resolved["world_size"] = rank.world_size
        dist.barrier()  # every rank has checked --out before rank 0 writes into it
        if rank.main:
            if overwrite and out.is_dir():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            _start_folder(spec, out, plan)
        result = fit_fold_ddp(config, plan.data, plan.folds[fold], rank=rank,
                              desc=f"fold {fold + 1}/{len(plan.folds)}")  # fmt: skip
        if rank.main:
            fdir = out / f"fold_{fold}"
            fdir.mkdir(exist_ok=True)
            _save_fold(fdir, result, spec, config, plan.data)
            (fdir / "metrics.json").write_text(json.dumps(result.row(), indent=2, default=float))
        dist.barrier()
    return result


def _execute(spec: RunSpec, config: TrainConfig, out: Path | None, *, overwrite: bool = False, resume: bool = False,
             data: FeatureStore | None = None, folds: Sequence[Fold] | None = None,
             model: ModelFactory | None = None) -> CVResult:  # fmt: skip
    t_start = time.perf_counter()
    plan = _plan(spec, config, out, overwrite=overwrite, resume=resume, data=data, folds=folds, model=model)
    if out is None:
        return _folds(spec, config, None, plan, t_start, model)
    if overwrite and not resume and out.is_dir():
        shutil.rmtree(out)
    created = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _folds(spec, config, out, plan, t_start, model)
    except Exception:
        if created and not has_progress(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _folds(spec: RunSpec, config: TrainConfig, out: Path | None, plan: _Plan, t_start: float,
           model: ModelFactory | None) -> CVResult:  # fmt: skip
    """Train (or, on resume, reload) every fold, pool them, and write the run folder when there is one."""
    from milcore.training.fold import fit_fold

    data, folds = plan.data, plan.folds
    if out is not None:
        _start_folder(spec, out, plan)
    results = []
    for fold in folds:
        desc = f"fold {fold.index + 1}/{len(folds)}"
        fdir = out / f"fold_{fold.index}" if out is not None else None
        if fdir is not None:
            fdir.mkdir(exist_ok=True)
        if fdir is not None and plan.resume and (fdir / "checkpoint.json").exists():
            result = _reload_fold(fdir, config, data, fold)
            log.info("fold %d: reusing its checkpoint", fold.index)
        else:
            result = fit_fold(config, data, fold, model=model, desc=desc,
                              state_path=None if fdir is None else fdir / "train_state.pt",
                              log_dir=None if fdir is None else fdir / "tensorboard")  # fmt: skip
            if fdir is not None:
                _save_fold(fdir, result, spec, config, data)
        row = result.metrics
        log.info("fold %d: balanced accuracy %.3f, AUROC %.3f (best epoch %d)", fold.index,
                 row["balanced_accuracy"], row["auroc"], result.best_epoch)  # fmt: skip
        results.append(result)
    name = config.model if model is None else getattr(model, "__name__", type(model).__name__)
    cv = pool_folds(results, data, config, name, n_boot=spec.n_boot, seed=spec.seed, truth=plan.truth)
    cv.metrics["seconds"] = time.perf_counter() - t_start
    if out is not None:
        write_run(out, cv, spec)
    return cv


def _start_folder(spec: RunSpec, out: Path, plan: _Plan) -> None:
    import yaml

    from milcore.data.splits import save_folds

    if plan.record:
        (out / "config.yaml").write_text(yaml.safe_dump(plan.resolved, sort_keys=False))
    if not (out / "splits.json").exists():
        save_folds(plan.folds, out / "splits.json", {"seed": spec.seed, "k": spec.folds, "cohort": spec.cohort})


def _reload_fold(fdir: Path, config: TrainConfig, data: FeatureStore, fold: Fold):
    """The result of a fold finished by an earlier, interrupted run (its checkpoint, re-predicted)."""
    from milcore.training.checkpoint import load_checkpoint
    from milcore.training.fold import fold_result
    from milcore.training.trainer import Trainer

    trainer = Trainer(config, data.dim, data.num_classes)
    model, card = load_checkpoint(fdir, trainer.device)
    history = json.loads((fdir / "history.json").read_text()) if (fdir / "history.json").exists() else []
    return fold_result(trainer, model, data, fold, float(card["temperature"]),
                       best_epoch=int(card.get("best_epoch", -1)), history=history)  # fmt: skip


def _save_fold(fdir: Path, result: Any, spec: RunSpec, config: TrainConfig, data: FeatureStore) -> None:
    from milcore.training.checkpoint import save_checkpoint

    fold = result.fold
    save_checkpoint(fdir, result.model, classes=list(data.classes or []), encoder=data.bank.info.to_dict(),
                    temperature=result.temperature, task=spec.task, train_config=config.to_dict(),
                    split={"fold": fold.index, "train": list(fold.train), "val": list(fold.val),
                           "test": list(fold.test)}, extra={"best_epoch": result.best_epoch})  # fmt: skip
    _write_history(fdir, result.history)
    (fdir / "train_state.pt").unlink(missing_ok=True)


def write_run(out: Path, cv: CVResult, spec: RunSpec) -> None:
    """Write the pooled outputs of ``cv`` into its run folder: predictions, attention, metrics.json, report."""
    from milcore.crossval.report import write_run_report
    from milcore.data.predictions import write_attention, write_predictions
    from milcore.trust.passport import passport_run

    table = cv.predictions
    write_predictions(out, table, cv.uncertainty.columns() if cv.uncertainty is not None else None)
    write_attention(out, table.bag_ids, [cv.attention[b] for b in table.bag_ids],
                    {"bank": spec.bank, "kind": "out-of-fold"})  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(cv.metrics, indent=2, default=float))
    write_run_report(out, cv.metrics, table, history_of={f.fold.index: out / f"fold_{f.fold.index}" for f in cv.folds})
    passport_run(out)  # passport.json / passport.md: intended use, provenance, metrics, uncertainty, limitations
    cv.out = out
