"""The training loop: packed instance-budget batches, class-weighted loss, early stopping on validation only.

A plain loop (nanoGPT-style): AdamW or SGD, optional Bag Embedding Loss and the aggregators' own
auxiliary losses, gradient clipping, bfloat16 autocast on CUDA, the best epoch kept by the
validation monitor, a resumable per-epoch state, and seeded, deterministic batching on CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from feature_cache.devices import resolve_device
from feature_cache.progress import progress
from milcore.losses import bag_cross_entropy, class_weights
from milcore.metrics.classification import balanced_accuracy
from milcore.models.input_norm import attach_input_norm, normalize_input
from milcore.training.config import TrainConfig
from milcore.training.features import FeatureStore

#: input standardisation never divides by less than this fraction of the median feature std
STD_FLOOR = 0.1

log = logging.getLogger(__name__)

CONTROL_SAMPLE = 20_000


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a config's ``amp`` on ``device`` (None: full precision)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16


@dataclass
class Predictions:
    """Outputs of a model over a store's bags, in store order.

    Attributes:
        logits: (B, C) float64.
        attention: per bag, (n,) or (n, H) float32 attention aligned with the bag's bank rows.
        embedding: (B, E) float32.
        instance_scores: per name, per bag arrays aligned with the bag's rows.
    """

    logits: np.ndarray
    attention: list[np.ndarray]
    embedding: np.ndarray
    instance_scores: dict[str, list[np.ndarray]] = field(default_factory=dict)


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        state: best weights (on CPU).
        best_epoch: epoch of those weights.
        history: one dict per epoch (losses, validation metrics, seconds).
        stopped_early: whether patience ran out.
    """

    state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]]
    stopped_early: bool


def positions(batch) -> np.ndarray:
    """Store positions of a batch's bags (kept in their metadata by :class:`FeatureStore`)."""
    return np.asarray([m["position"] for m in batch.metadata], dtype=np.int64)


def _tensorboard(log_dir: str | Path | None):
    """A TensorBoard ``SummaryWriter`` (one-line error when the optional package is missing)."""
    from feature_cache.errors import UserError

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError("TensorBoard logging needs the tensorboard package (pip install tensorboard)") from exc
    return SummaryWriter(log_dir=None if log_dir is None else str(log_dir))


class Trainer:
    """Trains one aggregator on a training store with early stopping on a validation store.

    Args:
        config: the training configuration.
        in_dim: feature dimension.
        num_classes: number of classes.
    """

    def __init__(self, config: TrainConfig, in_dim: int, num_classes: int) -> None:
        self.config = config
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.device = resolve_device(config.device)

    # ------------------------------------------------------------------ model
    def build_model(self) -> torch.nn.Module:
        """A fresh, seeded aggregator on the trainer's device."""
        from milcore.models import create_aggregator

        torch.manual_seed(self.config.seed)
        model = create_aggregator(self.config.model, in_dim=self.in_dim, num_classes=self.num_classes,
                                  **self.config.model_args)  # fmt: skip
        return model.to(self.device)

    def _optimizer(self, model: torch.nn.Module, extra: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad] + extra
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.config.lr, momentum=0.9, weight_decay=self.config.weight_decay)
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    # ------------------------------------------------------------------ training
    def _order(self, labels: np.ndarray, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, epoch, 17])
        if self.config.sampler == "balanced":
            counts = np.bincount(labels, minlength=self.num_classes).astype(float)
            p = np.where(counts[labels] > 0, 1.0 / counts[labels], 0.0)
            return rng.choice(len(labels), size=len(labels), replace=True, p=p / p.sum())
        return rng.permutation(len(labels))

    def _control_sampler(
        self, store: FeatureStore, labels: np.ndarray, normal_class: int, epoch: int, model: torch.nn.Module
    ) -> Callable[[], torch.Tensor]:
        """Control cells for AMiL's hook, standardised as the model's inputs are."""

        def sample() -> torch.Tensor:
            pos = np.flatnonzero(labels == normal_class)
            if len(pos) == 0:
                return torch.zeros(0, self.in_dim)
            batch = store.gather(pos)
            x = batch.x
            if len(x) > CONTROL_SAMPLE:
                g = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
                x = x[torch.randperm(len(x), generator=g)[:CONTROL_SAMPLE]]
            return normalize_input(model, x.to(self.device))

        return sample

    def fit(
        self,
        train: FeatureStore,
        y_train: np.ndarray,
        val: FeatureStore,
        y_val: np.ndarray,
        *,
        state_path: str | Path | None = None,
        desc: str = "train",
        log_dir: str | Path | None = None,
    ) -> tuple[torch.nn.Module, FitResult]:
        """Train, keeping the best epoch by the validation monitor.

        Args:
            train: training bags; y_train: (B,) their labels.
            val: validation bags; y_val: their labels (early stopping and selection only).
            state_path: a file to save the resumable state to after every epoch (resumed if present).
            desc: progress-bar label.
            log_dir: TensorBoard event folder, used when ``config.tensorboard`` is set.

        Returns:
            The model loaded with the best weights, and the :class:`FitResult`.
        """
        from milcore.models.base import EpochContext
        from milcore.models.registry import aggregator_needs, control_class_of

        cfg = self.config
        if cfg.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        model = self.build_model()
        if cfg.input_norm == "standardize":
            mean, std = train.moments()
            # a near-constant feature (dead channel, or one only rare cells use) is centred but not blown up
            std = np.maximum(std, STD_FLOOR * np.median(std))
            attach_input_norm(model, torch.from_numpy(mean), torch.from_numpy(std))
        y_train = np.asarray(y_train, dtype=np.int64)
        y_val = np.asarray(y_val, dtype=np.int64)
        weights = (class_weights(torch.from_numpy(y_train), self.num_classes) if cfg.class_weighting == "balanced"
                   else torch.ones(self.num_classes)).to(self.device)  # fmt: skip
        bel = self._bel(model)
        optimizer = self._optimizer(model, list(bel.parameters()) if bel is not None else [])
        amp = autocast_dtype(cfg.amp, self.device)
        y_train_t = torch.from_numpy(y_train)
        history: list[dict[str, float]] = []
        best = {"score": math.inf, "epoch": -1, "state": copy.deepcopy(model.state_dict())}
        start_epoch, bad_epochs = 0, 0
        if state_path is not None and Path(state_path).exists():
            start_epoch, bad_epochs, history, best = self._resume(Path(state_path), model, optimizer, bel)
        needs = aggregator_needs(model).hooks  # declared by the model (any nn.Module: none)
        normal_class = control_class_of(model)
        board = _tensorboard(log_dir) if cfg.tensorboard else None
        bar = progress(total=cfg.epochs, desc=desc, unit="epoch", initial=start_epoch)
        stopped = False
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            ctx = EpochContext(epoch, self._control_sampler(train, y_train, normal_class, epoch, model)
                               if "control_instances" in needs else None)  # fmt: skip
            model.on_epoch_start(ctx)
            total, count = 0.0, 0
            for batch in train.batches(self._order(y_train, epoch), cfg.batch_instances, cfg.max_bag_instances,
                                       seed=cfg.seed * 100_003 + epoch, num_workers=0 if train.in_memory
                                       else cfg.num_workers, pin_memory=self.device.type == "cuda",
                                       keep=1.0 - cfg.instance_dropout):  # fmt: skip
                b = batch.to(self.device, non_blocking=True)
                y = y_train_t[positions(batch)].to(self.device)
                with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                    out = model(b.x, b.ptr, b.coords, labels=y)
                nonempty = (b.ptr[1:] > b.ptr[:-1])
                loss = bag_cross_entropy(out.logits[nonempty], y[nonempty], weights)
                for aux in out.aux_losses.values():
                    loss = loss + aux.float()
                if bel is not None:
                    loss = loss + cfg.bel_weight * bel(out.embedding.float()[nonempty], y[nonempty])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                total += float(loss.detach()) * batch.num_bags
                count += batch.num_bags
            preds = self.predict(model, val, with_attention=False)
            val_loss = float(F.cross_entropy(torch.from_numpy(preds.logits).float(), torch.from_numpy(y_val)))
            val_ba = balanced_accuracy(y_val, preds.logits.argmax(1), self.num_classes)
            row = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss,
                   "val_balanced_accuracy": val_ba, "seconds": time.perf_counter() - t0}  # fmt: skip
            history.append(row)
            if board is not None:
                for key, value in row.items():
                    if key != "epoch":
                        board.add_scalar(key, value, epoch)
            score = val_loss if cfg.monitor == "val_loss" else -val_ba
            if score < best["score"] - 1e-6:
                best = {"score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
                bad_epochs = 0
            else:
                bad_epochs += 1
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_loss=f"{val_loss:.3f}", val_ba=f"{val_ba:.3f}")
            log.debug("%s epoch %d: %s", desc, epoch, row)
            if state_path is not None:
                self._save_state(Path(state_path), epoch + 1, bad_epochs, history, best, model, optimizer, bel)
            if bad_epochs >= cfg.patience and epoch + 1 >= cfg.min_epochs:
                stopped = True
                break
        bar.close()
        if board is not None:
            board.close()
        model.load_state_dict(best["state"])
        state = {k: v.detach().cpu().clone() for k, v in best["state"].items()}
        return model, FitResult(state, int(best["epoch"]), history, stopped)

    def _bel(self, model: torch.nn.Module) -> torch.nn.Module | None:
        if self.config.bel_weight <= 0:
            return None
        from milcore.losses import BagEmbeddingLoss

        with torch.no_grad():
            probe = model(torch.zeros(1, self.in_dim, device=self.device),
                          torch.tensor([0, 1], device=self.device))  # fmt: skip
        return BagEmbeddingLoss(num_classes=self.num_classes, dim=probe.embedding.shape[1]).to(self.device)

    # ------------------------------------------------------------------ resume
    @staticmethod
    def _save_state(path: Path, next_epoch: int, bad_epochs: int, history: list, best: dict,
                    model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    bel: torch.nn.Module | None) -> None:  # fmt: skip
        payload = {
            "next_epoch": next_epoch,
            "bad_epochs": bad_epochs,
            "history": history,
            "best_score": float(best["score"]),
            "best_epoch": int(best["epoch"]),
            "best_state": best["state"],
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "bel": bel.state_dict() if bel is not None else {},
            "torch_rng": torch.get_rng_state(),
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @staticmethod
    def _resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                bel: torch.nn.Module | None) -> tuple[int, int, list, dict]:  # fmt: skip
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if bel is not None and payload["bel"]:
            bel.load_state_dict(payload["bel"])
        torch.set_rng_state(payload["torch_rng"])
        log.info("resuming %s at epoch %d", path, payload["next_epoch"])
        best = {"score": payload["best_score"], "epoch": payload["best_epoch"], "state": payload["best_state"]}
        return int(payload["next_epoch"]), int(payload["bad_epochs"]), list(payload["history"]), best

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, store: FeatureStore, with_attention: bool = True) -> Predictions:
        """Logits, per-cell attention and embeddings for every bag of ``store`` (all cells, no sub-sampling)."""
        model.eval()
        amp = autocast_dtype(self.config.amp, self.device)
        n = len(store)
        logits: list[np.ndarray | None] = [None] * n
        emb: list[np.ndarray | None] = [None] * n
        att: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * n
        scores: dict[str, list[np.ndarray]] = {}
        order = np.arange(n)
        for batch in store.batches(order, self.config.batch_instances, 0, num_workers=0 if store.in_memory
                                   else self.config.num_workers):  # fmt: skip
            b = batch.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                out = model(b.x, b.ptr, b.coords)
            lg = out.logits.float().cpu().numpy().astype(np.float64)
            em = out.embedding.float().cpu().numpy()
            ptr = batch.ptr.numpy()
            a = out.attention.float().cpu().numpy() if with_attention else None
            extra = {k: v.float().cpu().numpy() for k, v in out.instance_scores.items()} if with_attention else {}
            for j, pos in enumerate(positions(batch)):
                logits[pos], emb[pos] = lg[j], em[j]
                if a is not None:
                    att[pos] = a[ptr[j] : ptr[j + 1]]
                for k, v in extra.items():
                    scores.setdefault(k, [np.zeros(0, dtype=np.float32)] * n)[pos] = v[ptr[j] : ptr[j + 1]]
        return Predictions(np.stack(logits) if n else np.zeros((0, self.num_classes)), att,
                           np.stack(emb) if n else np.zeros((0, 0), dtype=np.float32), scores)  # fmt: skip
