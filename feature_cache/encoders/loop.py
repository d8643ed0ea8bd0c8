"""What supervised and self-supervised encoder training share: the run folder, resuming, the epoch
loop with early stopping, and mixed precision.

A run folder holds ``recipe.json`` (every setting that decides the result, and the data's
fingerprint), ``state.pt`` (written atomically after every epoch: the networks, optimiser, schedule,
random generator, history and the best weights so far) and, when training ends,
``encoder.safetensors`` + ``encoder.json``. Running the same command again resumes after the last
finished epoch (a killed run loses at most the epoch in progress); a run with another recipe in the
same folder is refused, naming the settings that differ. ``state.pt`` is our own file and is read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from feature_cache.devices import native_bf16
from feature_cache.errors import UserError

log = logging.getLogger(__name__)

RECIPE = "recipe.json"
STATE = "state.pt"
WEIGHTS = "encoder.safetensors"
OWN_FILES = (RECIPE, STATE, WEIGHTS, "encoder.json", "head.safetensors", "attributes.safetensors")


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (empty where the OS has none): printed beside every timing."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


class RunFolder:
    """The output folder of one training run (see the module docstring).

    Args:
        out: the folder.
        recipe: JSON-ready settings that decide the result (device and output excluded).
        overwrite: start afresh, deleting this run's own files (others are left alone).
    """

    def __init__(self, out: str | Path, recipe: Mapping[str, Any], overwrite: bool = False) -> None:
        self.out = Path(out)
        self.recipe = json.loads(json.dumps(dict(recipe), sort_keys=True, default=str))
        self.overwrite = overwrite

    @property
    def weights(self) -> Path:
        """Where the trained weights go."""
        return self.out / WEIGHTS

    def check(self) -> dict[str, Any] | None:
        """Refuse another recipe; the saved state to resume from (``None``: a fresh run). Writes nothing.

        Raises:
            UserError: ``out`` is a file, or holds a run of another recipe (the keys that differ named).
        """
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder")
        recipe_file = self.out / RECIPE
        if self.overwrite or not recipe_file.exists():
            return None
        try:
            old = json.loads(recipe_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{recipe_file}: unreadable ({exc}); use --overwrite to start afresh") from None
        diff = sorted(k for k in set(old) | set(self.recipe) if old.get(k) != self.recipe.get(k))
        if diff:
            shown = "; ".join(f"{k}: {json.dumps(old.get(k))} -> {json.dumps(self.recipe.get(k))}" for k in diff[:4])
            raise UserError(
                f"{recipe_file}: resuming with another recipe ({len(diff)} setting(s) differ: "
                f"{', '.join(diff)}; {shown}); use a new --out, or --overwrite to start afresh"
            )
        state_file = self.out / STATE
        if not state_file.exists():
            return None
        try:
            return torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{state_file}: unreadable training state ({type(exc).__name__}); use --overwrite "
                            "to start afresh") from None  # fmt: skip

    def start(self) -> None:
        """Create the folder (clearing this run's files when overwriting) and write ``recipe.json``."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            for name in OWN_FILES:
                (self.out / name).unlink(missing_ok=True)
        if not (self.out / RECIPE).exists():
            (self.out / RECIPE).write_text(json.dumps(self.recipe, indent=2, sort_keys=True) + "\n")

    def save_state(self, state: Mapping[str, Any]) -> None:
        """Write ``state.pt`` atomically."""
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.out)
        os.close(fd)
        try:
            torch.save(dict(state), tmp)
            os.replace(tmp, self.out / STATE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def disk_free_check(self, need_bytes: int) -> None:
        """Refuse to start when the disk cannot hold the state file."""
        free = shutil.disk_usage(self.out if self.out.exists() else self.out.parent).free
        if free < need_bytes:
            raise UserError(f"{self.out}: only {free / 1e6:.0f} MB free, training state needs about "
                            f"{need_bytes / 1e6:.0f} MB")  # fmt: skip


@dataclass(frozen=True)
class Precision:
    """How a device computes: autocast dtype (``None``: float32), gradient scaling, channels-last."""

    autocast: torch.dtype | None
    scaler: bool
    channels_last: bool

    def context(self, device: torch.device) -> Any:
        """The autocast context for ``device``."""
        return torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)


def precision_for(device: torch.device, amp: bool = True, channels_last: bool | None = None) -> Precision:
    """AMP and memory format for a device.

    CUDA: bfloat16 autocast where supported, else float16 with a gradient scaler; channels-last (tensor
    cores). CPU with native bfloat16 (:func:`~feature_cache.devices.native_bf16`): bfloat16 autocast and
    channels-last (a
    ``compact_cnn`` training step at 28 px ran 2.5x faster than float32 on an AVX512-BF16 CPU); other
    CPUs: float32, contiguous (emulated bfloat16 is slower). ``channels_last`` overrides the format.
    """
    dtype: torch.dtype | None = None
    scaler = False
    if amp and device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        dtype, scaler = (torch.bfloat16 if bf16 else torch.float16), not bf16
    elif amp and device.type == "cpu" and native_bf16("cpu"):
        dtype = torch.bfloat16
    return Precision(dtype, scaler, dtype is not None if channels_last is None else bool(channels_last))


@dataclass
class LoopState:
    """Progress of the epoch loop (saved in ``state.pt``)."""

    epoch: int = 0
    best_score: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    finished: bool = False
    seconds: float = 0.0


def _clone(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {n: t.detach().cpu().clone() for n, t in m.state_dict().items()} for k, m in modules.items()}


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> Any:
    """Learning rate stepped per batch: linear warm-up over ``warmup_steps`` to the optimiser's rate, then a
    cosine decay to zero at ``total_steps`` (a ``torch`` ``LambdaLR``; its state resumes with the run)."""
    import math

    total, warm = max(1, int(total_steps)), max(0, int(warmup_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    run: RunFolder,
    saved: dict[str, Any] | None,
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    epochs: int,
    patience: int,
    train_one: Callable[[int], float],
    validate: Callable[[], dict[str, float]],
    score: Callable[[dict[str, float]], float],
    min_epochs: int = 0,
    logged: Callable[[str], bool] | None = None,
) -> LoopState:
    """Train epoch by epoch, validating, keeping the best weights, saving state, stopping early.

    Args:
        run: the run folder.
        saved: the state :meth:`RunFolder.check` returned (resume) or ``None``.
        modules: the trained networks by name (their best weights are kept).
        optimizer, scheduler: stepped by ``train_one`` (the scheduler per batch, :func:`warmup_cosine`);
            saved and restored here.
        generator: the random generator of batches and augmentations (its state is saved).
        epochs: maximum epochs.
        patience: epochs without a better validation score before stopping (0: never stop early).
        min_epochs: never stop early before this epoch (the high-learning-rate start of a cosine schedule
            is noisy: a 40-epoch run stopped there at epoch 12 with patience 5).
        train_one: trains one epoch, returns the mean training loss.
        validate: validation metrics of the current weights.
        score: the number to maximise from the metrics.
        logged: which metric keys the epoch's log line shows (default all; every metric goes to the history).

    Returns:
        The loop state; the modules hold the best weights.
    """
    state = LoopState()
    if saved is not None:
        for k, m in modules.items():
            m.load_state_dict(saved["modules"][k])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        loop = saved["loop"]
        state = LoopState(loop["epoch"], loop["best_score"], loop["best_epoch"], loop["bad_epochs"],
                          json.loads(loop["history"]), saved["best"], loop["finished"], loop["seconds"])  # fmt: skip
        if not state.finished:
            log.info("%s: resuming after epoch %d of %d", run.out, state.epoch, epochs)
    while not state.finished and state.epoch < epochs:
        t0 = time.perf_counter()
        loss = train_one(state.epoch)
        metrics = validate()
        value = score(metrics)
        state.epoch += 1
        state.seconds += time.perf_counter() - t0
        state.history.append({"epoch": state.epoch, "train_loss": loss, **metrics,
                              "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
        if value > state.best_score:
            state.best_score, state.best_epoch, state.bad_epochs = value, state.epoch, 0
            state.best = _clone(modules)
        else:
            state.bad_epochs += 1
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if logged is None or logged(k))
        log.info("epoch %d/%d: train loss %.4f, %s (%.1f s)", state.epoch, epochs, loss, shown,
                 time.perf_counter() - t0)  # fmt: skip
        if patience and state.bad_epochs >= patience and state.epoch >= min_epochs:
            log.info("early stop: no better validation score for %d epochs (best at epoch %d)", patience,
                     state.best_epoch)  # fmt: skip
            state.finished = True
        state.finished = state.finished or state.epoch >= epochs
        run.save_state({
            "modules": {k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {}, "generator": generator.get_state(),
            "best": state.best,
            "loop": {"epoch": state.epoch, "best_score": state.best_score, "best_epoch": state.best_epoch,
                     "bad_epochs": state.bad_epochs, "history": json.dumps(state.history),
                     "finished": state.finished, "seconds": state.seconds},
        })  # fmt: skip
    for k, m in modules.items():
        if k in state.best:
            m.load_state_dict(state.best[k])
    return state
