"""Checkpoints: weights in safetensors plus a JSON card (model config, task, classes, encoder fingerprint,
temperature, training config, split, versions). Nothing is ever unpickled.

Integrity: the card records the SHA-256 of the weights file (``weights_sha256``) and of its own content
(``card_sha256``, over the canonical JSON of every other key), so a flipped byte in either file is
refused on load instead of predicting from corrupted weights. Cards written before these keys existed
load with a warning. Every problem with a checkpoint is a :class:`UserError` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from feature_cache.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "milcore-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS = "model.safetensors"
CARD = "checkpoint.json"
WEIGHTS_HASH = "weights_sha256"
CARD_HASH = "card_sha256"


def versions() -> dict[str, str]:
    """Versions that produced a result."""
    import numpy

    from milcore import __version__

    return {"milcore": __version__, "torch": str(torch.__version__), "numpy": numpy.__version__,
            "python": platform.python_version()}  # fmt: skip


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def card_sha256(card: dict[str, Any]) -> str:
    """Hex SHA-256 of a card's canonical JSON without its own ``card_sha256`` key."""
    body = {k: v for k, v in card.items() if k != CARD_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _replace_atomic(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    *,
    classes: list[str],
    encoder: dict[str, Any] | None,
    temperature: float = 1.0,
    task: str | None = None,
    train_config: dict[str, Any] | None = None,
    split: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``checkpoint.json`` into ``folder``; returns the folder.

    Both files are written through a temporary file and a rename, weights first: a card on disk always
    describes complete weights, whose SHA-256 it records.
    """
    from safetensors.torch import save_file

    from milcore.models.input_norm import has_input_norm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    digest = file_sha256(tmp)
    _replace_atomic(tmp, folder / WEIGHTS)
    card = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": getattr(model, "aggregator_name", type(model).__name__),
        "model_config": dataclasses.asdict(model.config),
        "task": task,
        "classes": list(classes),
        "encoder": encoder,
        "temperature": float(temperature),
        "input_norm": has_input_norm(model),
        "train_config": train_config or {},
        "split": split or {},
        "versions": versions(),
        **(extra or {}),
        WEIGHTS_HASH: digest,
    }
    card = json.loads(json.dumps(card, default=str))  # the card exactly as it will be read back
    card[CARD_HASH] = card_sha256(card)
    tmp = folder / (CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=2))
    _replace_atomic(tmp, folder / CARD)
    return folder


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_card(card: Any, card_path: Path) -> dict[str, Any]:
    """Check a parsed card's integrity and structure; returns it.

    Raises:
        UserError: naming ``card_path``: not an object, wrong format, content that does not match its
            recorded SHA-256, or a missing/ill-typed key.
    """
    if not isinstance(card, dict):
        raise UserError(f"{card_path}: not a milcore checkpoint card (a JSON object was expected)")
    if card.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{card_path}: not a milcore checkpoint card (format {card.get('format')!r})")
    version = card.get("format_version")
    if not _is_int(version):
        raise UserError(f"{card_path}: checkpoint card has no valid format_version ({version!r})")
    if version > CHECKPOINT_VERSION:
        raise UserError(f"{card_path}: checkpoint format {version} is newer than this milcore understands "
                        f"({CHECKPOINT_VERSION}); upgrade milcore")  # fmt: skip
    for key in (CARD_HASH, WEIGHTS_HASH):
        if key in card and not (isinstance(card[key], str) and re.fullmatch(r"[0-9a-f]{64}", card[key])):
            raise UserError(f"{card_path}: {key!r} is not a SHA-256 hex digest ({card[key]!r}); the card is damaged")
    if CARD_HASH in card and card[CARD_HASH] != card_sha256(card):
        raise UserError(f"{card_path}: the card's content does not match the SHA-256 recorded in it "
                        f"(edited or corrupted); restore the file from the training run")  # fmt: skip
    if CARD_HASH not in card and WEIGHTS_HASH in card:
        log.warning("%s: the card records no SHA-256 of its own content; edits to it cannot be detected", card_path)
    problems = []
    if not isinstance(card.get("model"), str):
        problems.append("'model' (aggregator name) missing or not a string")
    cfg = card.get("model_config")
    if not isinstance(cfg, dict):
        problems.append("'model_config' missing or not an object")
    else:
        if not (_is_int(cfg.get("in_dim")) and cfg["in_dim"] > 0):
            problems.append(f"'model_config.in_dim' must be a positive integer, got {cfg.get('in_dim')!r}")
        if not (_is_int(cfg.get("num_classes")) and cfg["num_classes"] >= 2):
            problems.append(f"'model_config.num_classes' must be an integer >= 2, got {cfg.get('num_classes')!r}")
    classes = card.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        problems.append("'classes' missing or not a list of names")
    elif len(set(classes)) != len(classes):
        problems.append(f"'classes' has duplicates: {classes}")
    elif isinstance(cfg, dict) and cfg.get("num_classes") != len(classes):
        problems.append(f"{len(classes)} classes but model_config.num_classes = {cfg.get('num_classes')!r}")
    temp = card.get("temperature", 1.0)
    if not (isinstance(temp, int | float) and not isinstance(temp, bool) and math.isfinite(temp) and temp > 0):
        problems.append(f"'temperature' must be a finite positive number, got {temp!r}")
    if not isinstance(card.get("input_norm", False), bool):
        problems.append(f"'input_norm' must be true or false, got {card.get('input_norm')!r}")
    if not (card.get("encoder") is None or isinstance(card.get("encoder"), dict)):
        problems.append("'encoder' must be an object")
    if not (card.get("task") is None or isinstance(card.get("task"), str)):
        problems.append(f"'task' must be a column name, got {card.get('task')!r}")
    if problems:
        raise UserError(f"{card_path}: invalid checkpoint card: {'; '.join(problems)}")
    return card


def read_card(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder and its validated card; ``path`` may be the folder, the card or the weights file.

    Raises:
        UserError: naming the file: not a checkpoint, unreadable or invalid card (see :func:`validate_card`).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    folder = path if path.is_dir() else path.parent
    card_path = folder / CARD
    if not card_path.is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{path}: not a milcore checkpoint (expected {CARD} and {WEIGHTS})")
    try:
        card = json.loads(card_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise UserError(f"{card_path}: unreadable checkpoint card (not JSON: {detail})") from exc
    return folder, validate_card(card, card_path)


def check_weights_file(folder: Path, card: dict[str, Any]) -> None:
    """Compare the weights file with the SHA-256 its card records (a warning when none is recorded).

    Raises:
        UserError: the weights do not match the recorded SHA-256.
    """
    weights, card_path = folder / WEIGHTS, folder / CARD
    recorded = card.get(WEIGHTS_HASH)
    if recorded is None:
        log.warning("%s: no SHA-256 of the weights recorded (written by an older milcore); the integrity of %s "
                    "cannot be checked", card_path, weights)  # fmt: skip
        return
    if file_sha256(weights) != recorded:
        raise UserError(f"{weights}: weights do not match the SHA-256 recorded in {card_path} "
                        f"(corrupted or replaced); restore the file from the training run")  # fmt: skip


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as exc:  # SafetensorError, or a header that names impossible dtypes/offsets
        raise UserError(f"{weights}: not a readable safetensors weights file "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{weights}: non-finite weights (NaN or Inf) in {len(bad)} tensor(s): "
                        f"{', '.join(sorted(bad)[:5])}")  # fmt: skip
    return state


def _build_model(card: dict[str, Any], card_path: Path, on_meta: bool) -> torch.nn.Module:
    from milcore.models import create_aggregator
    from milcore.models.input_norm import attach_input_norm
    from milcore.models.registry import get_aggregator_entry

    name = card["model"]
    try:
        entry = get_aggregator_entry(name)
    except UserError as exc:
        raise UserError(f"{card_path}: {exc}") from exc
    cfg = dict(card["model_config"])
    defaults = {f.name: f.default for f in dataclasses.fields(entry.config_class)}
    for key, value in cfg.items():  # JSON turned tuples into lists
        if isinstance(value, list) and isinstance(defaults.get(key), tuple):
            cfg[key] = tuple(value)
    in_dim, num_classes = cfg.pop("in_dim"), cfg.pop("num_classes")
    try:
        if on_meta:  # shapes only: a bogus configuration allocates nothing
            with torch.device("meta"):
                model = create_aggregator(name, in_dim=in_dim, num_classes=num_classes, **cfg)
                if card.get("input_norm"):
                    attach_input_norm(model)
        else:
            model = create_aggregator(name, in_dim=in_dim, num_classes=num_classes, **cfg)
            if card.get("input_norm"):
                attach_input_norm(model)  # placeholders, filled from the weights file
    except (UserError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{card_path}: model_config does not build a {name} model ({exc})") from exc
    return model


def _check_tensors(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], weights: Path,
                   name: str) -> None:  # fmt: skip
    from feature_cache.encoders.weights import state_mismatch

    problems = state_mismatch(expected, state)
    if problems:
        raise UserError(f"{weights}: tensors do not fit the {name} model of its card: {problems}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the aggregator of a checkpoint and load its weights (safetensors only), checking everything.

    Checks, in order: the card (JSON, format, its own SHA-256, keys and types), the weights' SHA-256
    recorded in the card, the safetensors file (readable, finite values), and that tensor names and
    shapes are exactly those of the model the card describes (after the model's ``upgrade_state`` has
    renamed the tensors of an earlier version of it).

    Returns:
        ``(model in eval mode, card)``.

    Raises:
        UserError: naming the file, for any of the problems above or an unknown model.
    """
    folder, card = read_card(path)
    card_path, weights = folder / CARD, folder / WEIGHTS
    check_weights_file(folder, card)
    state = _read_weights(weights)
    skeleton = _build_model(card, card_path, on_meta=True)
    if hasattr(skeleton, "upgrade_state"):  # tensors of an earlier version of the model
        state = skeleton.upgrade_state(dict(state))
    _check_tensors(skeleton.state_dict(), state, weights, card["model"])
    model = _build_model(card, card_path, on_meta=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise UserError(f"{weights}: weights do not fit a {card['model']} model ({str(exc).splitlines()[0]})") from exc
    return model.to(device).eval(), card


def checkpoint_task(folder: str | Path, card: dict[str, Any]) -> str | None:
    """The task (label column) a checkpoint was trained for: its card, else its run's ``config.yaml``."""
    if card.get("task"):
        return str(card["task"])
    from milcore.data.inputs import read_run_config

    try:
        cfg = read_run_config(Path(folder).parent) or {}
    except UserError:
        return None
    task = cfg.get("run", {}).get("task") if isinstance(cfg.get("run"), dict) else None
    return str(task) if task else None


@dataclass(frozen=True)
class RunFolds:
    """The fold checkpoints of one training run folder and whether the run finished.

    Attributes:
        run: the run folder.
        used: fold indices with a finished checkpoint.
        expected: folds the run was configured with (``None`` when no file says).
        finished: whether the run wrote its final ``metrics.json``.
    """

    run: Path
    used: tuple[int, ...]
    expected: int | None
    finished: bool

    @property
    def complete(self) -> bool:
        """Every configured fold has a checkpoint and the run wrote its final metrics."""
        return self.finished and (self.expected is None or set(self.used) >= set(range(self.expected)))

    def describe(self) -> str:
        """E.g. ``ensemble of 2 of 5 folds`` (``ensemble of 5 folds`` when complete)."""
        if self.complete:
            return f"ensemble of {len(self.used)} folds"
        return f"ensemble of {len(self.used)} of {self.expected if self.expected is not None else '?'} folds"

    def problem(self) -> str:
        """Why the run is incomplete (empty when complete)."""
        parts = []
        if self.expected is not None:
            missing = [f"fold_{k}" for k in range(self.expected) if k not in self.used]
            if missing:
                parts.append(f"{len(self.used)} of {self.expected} fold checkpoints (missing {', '.join(missing[:6])})")
        if not self.finished:
            parts.append("no final metrics.json")
        return "; ".join(parts)


@dataclass(frozen=True)
class CheckpointSet:
    """The checkpoints one prediction averages.

    Attributes:
        paths: fold checkpoint folders, in order.
        runs: run folders that were expanded into their folds.
    """

    paths: tuple[Path, ...]
    runs: tuple[RunFolds, ...] = ()

    @property
    def partial(self) -> bool:
        """Whether a run contributed only part of its folds."""
        return any(not r.complete for r in self.runs)

    def describe(self) -> str:
        """One phrase for logs and reports, e.g. ``ensemble of 2 of 5 folds (partial run RUN)``."""
        if len(self.runs) == 1 and len(self.paths) == len(self.runs[0].used):
            r = self.runs[0]
            return r.describe() + (f" of the partial run {r.run}" if not r.complete else "")
        text = f"{len(self.paths)} checkpoint(s)"
        partial = [r for r in self.runs if not r.complete]
        if partial:
            text += "; partial: " + "; ".join(f"{r.run}: {r.describe()}" for r in partial)
        return text

    def to_dict(self) -> dict:
        """JSON-ready description (stored in ``predictions.json`` and ``attention.h5``)."""
        return {"checkpoints": [str(p.resolve()) for p in self.paths], "partial": self.partial,
                "description": self.describe(),
                "runs": [{"run": str(r.run.resolve()), "folds_used": list(r.used), "folds_expected": r.expected,
                          "finished": r.finished, "complete": r.complete} for r in self.runs]}  # fmt: skip


def _fold_index(path: Path) -> int | None:
    m = re.fullmatch(r"fold_(\d+)", path.name)
    return int(m.group(1)) if m else None


def _configured_folds(run: Path) -> int | None:
    """Folds a run was configured with: ``config.yaml`` (run.folds), else ``splits.json``, else ``metrics.json``."""
    from milcore.data.inputs import read_run_config

    try:
        cfg = read_run_config(run) or {}
        folds = cfg.get("run", {}).get("folds") if isinstance(cfg.get("run"), dict) else None
        if isinstance(folds, int) and folds > 0:
            return folds
        for name in ("splits.json", "metrics.json"):
            if (run / name).is_file():
                data = json.loads((run / name).read_text())
                value = data.get("folds") if isinstance(data, dict) else None
                if isinstance(value, list) and value:
                    return len(value)
                if isinstance(value, int) and value > 0:
                    return value
    except (OSError, UnicodeDecodeError, ValueError, UserError) as exc:
        raise UserError(f"{run}: unreadable run configuration ({exc})") from exc
    return None


def inspect_run(run: str | Path) -> RunFolds:
    """The finished fold checkpoints of a training run folder and whether the run is complete."""
    run = Path(run)
    used = sorted(k for p in run.glob("fold_*/" + CARD) if (k := _fold_index(p.parent)) is not None)
    return RunFolds(run, tuple(used), _configured_folds(run), (run / "metrics.json").is_file())


def resolve_checkpoints(paths: Sequence[str | Path], *, allow_partial: bool = False) -> CheckpointSet:
    """Expand fold folders and run folders into the checkpoints to average, refusing incomplete runs.

    Args:
        paths: fold checkpoint folders (or their ``checkpoint.json``) and/or training run folders.
        allow_partial: accept a run that has fewer fold checkpoints than configured or no final metrics
            (logged as a warning and recorded in the output).

    Raises:
        UserError: a path that is neither, a run without any finished fold, or an incomplete run.
    """
    if not paths:
        raise UserError("no checkpoint given")
    out: list[Path] = []
    runs: list[RunFolds] = []
    for p in map(Path, paths):
        if p.is_file() and p.name in (CARD, WEIGHTS):
            p = p.parent
        if (p / CARD).is_file():
            out.append(p)
            continue
        if not p.exists():
            raise UserError(f"{p}: no such checkpoint or run folder")
        folds = inspect_run(p) if p.is_dir() else None
        if folds is None or not folds.used:
            hint = " (a training run with no finished fold yet)" if p.is_dir() and (p / "config.yaml").exists() else ""
            raise UserError(f"{p}: not a checkpoint folder nor a run folder with fold checkpoints{hint}")
        if not folds.complete:
            if not allow_partial:
                raise UserError(f"{p}: incomplete training run: {folds.problem()}; finish it with 'milcore train "
                                f"--resume --out {p} ...' or pass --allow-partial to predict with the "
                                f"{len(folds.used)} finished fold(s)")  # fmt: skip
            log.warning("%s: partial run (%s): predicting with an %s", p, folds.problem(), folds.describe())
        runs.append(folds)
        out += [p / f"fold_{k}" for k in folds.used]
    seen: set[Path] = set()
    unique = [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]  # type: ignore[func-returns-value]
    if len(unique) < len(out):
        log.warning("%d checkpoint(s) were given more than once and are used once", len(out) - len(unique))
    return CheckpointSet(tuple(unique), tuple(runs))
