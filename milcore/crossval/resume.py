"""Resuming a run folder: what may change on ``--resume`` and the check that nothing else did."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from feature_cache.errors import UserError
from milcore.training.config import PLACEMENT_OPTIONS, TrainConfig

log = logging.getLogger(__name__)


#: Training options that may change on ``--resume``: where and how fast a run computes, not what it learns.
RESUMABLE_CHANGES = PLACEMENT_OPTIONS

#: ``RunSpec`` fields that decide the folds and the labels (paths are compared through fingerprints).
RESUME_KEYS = ("task", "folds", "seed", "group_column")


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


def read_record(out: Path) -> dict[str, Any] | None:
    """The configuration a run folder recorded (``None`` if it has none yet)."""
    from milcore.data.inputs import read_run_config

    return read_run_config(out, "cannot check what --resume would continue")


def has_progress(out: Path) -> bool:
    """Whether ``out`` holds anything a ``--resume`` would continue (a fold's checkpoint or training state)."""
    return any(out.glob("fold_*/checkpoint.json")) or any(out.glob("fold_*/train_state.pt"))
