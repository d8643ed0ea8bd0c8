"""Join one-fold runs (``milcore train --fold K``, e.g. a job array) into the run folder of the whole run.

Each input is a run folder written by :func:`~milcore.crossval.run.train_fold_run` (``config.yaml``
recording ``fold: K``, ``splits.json``, ``fold_K/``). :func:`merge_runs` checks, before it writes
anything, that the inputs were trained on the same bank and labels (fingerprints), task, folds, seed
and training options (where and how fast a run computes may differ: :data:`RESUMABLE_CHANGES`), with
byte-identical splits, and that together they hold every fold exactly once. It then copies the folds
into ``out`` with the shared ``config.yaml`` (without ``fold``) and ``splits.json``, and finishes the
run as an interrupted single-process run is finished on ``--resume``: every fold's checkpoint is
reloaded and re-predicted, the folds are pooled, and ``metrics.json`` (with bootstrap CIs),
``predictions.csv``, ``attention.h5``, the report and the passport are written. So the merged folder
equals the single-process one except for wall-clock times.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from feature_cache.errors import OutputExistsError, UserError
from milcore.crossval.resume import RESUMABLE_CHANGES

log = logging.getLogger(__name__)

#: ``config.yaml`` entries that must be equal across the one-fold runs (``train`` is compared key by key).
SAME_KEYS = ("run", "classes", "encoder")


def _read_fold_run(path: Path) -> tuple[dict[str, Any], int]:
    """The recorded configuration of a one-fold run and its fold; one-line errors naming ``path``."""
    from milcore.data.inputs import read_run_config

    if not path.is_dir():
        raise UserError(f"{path}: not a run folder")
    record = read_run_config(path, "cannot merge it")
    if record is None:
        raise UserError(f"{path}: no config.yaml (not a run folder written by milcore train --fold)")
    fold = record.get("fold")
    if not isinstance(fold, int):
        raise UserError(f"{path}: config.yaml records no fold (a run of every fold needs no merge; "
                        "merge the runs of milcore train --fold K)")  # fmt: skip
    fdir = path / f"fold_{fold}"
    if not (fdir / "checkpoint.json").is_file() or not (fdir / "model.safetensors").is_file():
        raise UserError(f"{fdir}: no checkpoint (the fold did not finish; rerun it with milcore train --fold {fold} "
                        f"--resume --out {path})")  # fmt: skip
    if not (path / "splits.json").is_file():
        raise UserError(f"{path}: splits.json missing")
    return record, fold


def _differences(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Keys on which two recorded configurations differ in what is learnt (not where it ran)."""
    diff = [k for k in SAME_KEYS if first.get(k) != other.get(k)]
    old_in, new_in = first.get("inputs") or {}, other.get("inputs") or {}
    diff += [k for k in ("bank_fingerprint", "labels_fingerprint") if old_in.get(k) != new_in.get(k)]
    a, b = first.get("train") or {}, other.get("train") or {}
    diff += [f"train.{k}" for k in sorted(set(a) | set(b)) if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]
    return diff


def check_fold_runs(runs: Sequence[str | Path]) -> tuple[dict[str, Any], dict[int, Path]]:
    """Check that ``runs`` are one-fold runs of one cross-validation holding every fold once.

    Returns:
        The shared recorded configuration (without ``fold``) and the run folder of each fold.

    Raises:
        UserError: no runs, a folder that is not a finished one-fold run, runs of different inputs,
            options or splits (naming the keys), a fold given twice, or folds missing (naming them
            and the command that trains them).
    """
    if not runs:
        raise UserError("report merge: no run folders given")
    paths = [Path(r) for r in runs]
    first_record, first_fold = _read_fold_run(paths[0])
    splits = (paths[0] / "splits.json").read_bytes()
    by_fold: dict[int, Path] = {first_fold: paths[0]}
    for path in paths[1:]:
        record, fold = _read_fold_run(path)
        diff = _differences(first_record, record)
        if diff:
            raise UserError(f"{path}: trained with other inputs or options than {paths[0]} (differ: "
                            f"{', '.join(diff)}); only folds of one cross-validation can be merged")  # fmt: skip
        if (path / "splits.json").read_bytes() != splits:
            raise UserError(f"{path}: splits.json differs from that of {paths[0]} (other folds)")
        if fold in by_fold:
            raise UserError(f"{path}: fold {fold} given twice (also {by_fold[fold]})")
        by_fold[fold] = path
    k = int(first_record["run"]["folds"])
    missing = [f for f in range(k) if f not in by_fold]
    if missing:
        raise UserError(f"report merge: fold(s) {', '.join(map(str, missing))} of {k} missing; train them with "
                        f"milcore train ... --fold K (same options) and pass their run folders")  # fmt: skip
    shared = {key: value for key, value in first_record.items() if key not in ("fold", "world_size")}
    return shared, by_fold


def merge_runs(runs: Sequence[str | Path], out: str | Path, *, overwrite: bool = False) -> Any:
    """Join one-fold runs into the run folder ``out`` of the whole cross-validation (see the module docstring).

    Args:
        runs: run folders of ``milcore train --fold K``, one per fold, any order.
        out: the run folder to write (must not exist or be empty, unless ``overwrite``).
        overwrite: replace a non-empty ``out``.

    Returns:
        The pooled :class:`~milcore.crossval.result.CVResult`.

    Raises:
        UserError: see :func:`check_fold_runs`; an occupied ``out``; an ``out`` that is one of the inputs;
            a bank or cohort that changed since the folds were trained (refused as on ``--resume``).
    """
    import yaml

    from milcore.crossval.run import train_run
    from milcore.training.config import RunSpec, TrainConfig

    out = Path(out)
    shared, by_fold = check_fold_runs(runs)
    if any(out.resolve() == p.resolve() for p in by_fold.values()):
        raise UserError(f"{out}: the output is also an input run folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite)")
    spec = RunSpec.from_dict(shared["run"])
    config = TrainConfig.from_dict(shared["train"])
    if out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        first = by_fold[min(by_fold)]
        (out / "config.yaml").write_text(yaml.safe_dump(shared, sort_keys=False))
        shutil.copyfile(first / "splits.json", out / "splits.json")
        for fold, path in sorted(by_fold.items()):
            shutil.copytree(path / f"fold_{fold}", out / f"fold_{fold}",
                            ignore=shutil.ignore_patterns("metrics.json", "train_state.pt"))  # fmt: skip
        log.info("report merge: %d folds copied into %s; reloading and pooling them", len(by_fold), out)
        cv = train_run(spec, config, out, resume=True)  # every fold has its checkpoint: nothing is trained
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    sources = {str(fold): str(path) for fold, path in sorted(by_fold.items())}
    (out / "merged_from.json").write_text(json.dumps(sources, indent=2))
    return cv
