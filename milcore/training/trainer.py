"""The training loop: packed instance-budget batches, class-weighted loss, early stopping on validation only.

A plain loop (nanoGPT-style): AdamW or SGD, optional Bag Embedding Loss and the aggregators' own
auxiliary losses, gradient clipping, mixed precision (bfloat16 autocast on CUDA by default; ``bf16`` or
``fp16`` with loss scaling on any device), the best epoch kept by the validation monitor, a resumable
per-epoch state, and seeded, deterministic batching on CPU.

:meth:`Trainer.fit` trains a registered aggregator (``config.model``) or any ``nn.Module`` passed as
``model=`` whose ``forward(x, ptr[, coords][, labels])`` returns a :class:`~milcore.models.MILOutput`;
the first batch is checked against that contract (:func:`~milcore.models.output.check_output_contract`),
so a module that breaks it fails with one line naming what is wrong.
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
from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.progress import progress
from milcore.data.store import FeatureStore
from milcore.losses import bag_cross_entropy, class_weights
from milcore.metrics.classification import balanced_accuracy
from milcore.models.input_norm import attach_input_norm, normalize_input
from milcore.models.output import check_output_contract
from milcore.training.config import TrainConfig
from milcore.training.loop import OptimizerStep, autocast, autocast_dtype, epoch_order, forward, input_dtype

#: input standardisation never divides by less than this fraction of the median feature std
STD_FLOOR = 0.1

log = logging.getLogger(__name__)

CONTROL_SAMPLE = 20_000


#: What :meth:`Trainer.fit` accepts as ``model``: a module, or a factory ``(in_dim, num_classes) -> module``
#: (called after seeding, once per fit: what cross-validation needs to start every fold afresh).
ModelFactory = Callable[[int, int], torch.nn.Module]


@dataclass
class ModelOutputs:
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
        validate_seconds: time spent predicting the validation bags (the rest of the fit optimises).
    """

    state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]]
    stopped_early: bool
    validate_seconds: float = 0.0


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


def positions(batch) -> np.ndarray:
    """Store positions of a batch's bags (kept in their metadata by :class:`FeatureStore`)."""
    return np.asarray([m["position"] for m in batch.metadata], dtype=np.int64)


def _tensorboard(log_dir: str | Path | None):
    """A TensorBoard ``SummaryWriter`` (one-line error when the optional package is missing)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError("TensorBoard logging needs the tensorboard package (pip install tensorboard)") from exc
    return SummaryWriter(log_dir=None if log_dir is None else str(log_dir))


class Trainer:
    """Trains one bag classifier on a labelled training store with early stopping on a labelled validation store.

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

    def use_deterministic_algorithms(self) -> None:
        """Ask torch for deterministic algorithms when the config does, on CPU (process-wide; :meth:`fit` calls it).

        The first call in a process imports ``torch._dynamo`` (over a second on the 2-core machine), so callers
        that time a fit (:func:`~milcore.training.fold.fit_fold`, whose time the benchmarks divide into
        training bags/s) call it before starting their clock; later calls cost nothing.
        """
        if self.config.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
            # ... without its default of filling every uninitialised tensor with NaN (a guard against kernels
            # that read memory they did not write, which no result of ours depends on: the reproducibility
            # tests compare fits bit for bit): in a DTFD-MIL fit's profile they were 9 % of the operator time, and
            # dropping them saved 0-10 % (median 7 %) of the CPU seconds of mean, ABMIL, DTFD-MIL and RRT-MIL fits
            # in two A/B pairs (benchmarks/README.md, issue 18 speed)
            torch.utils.deterministic.fill_uninitialized_memory = False

    # ------------------------------------------------------------------ model
    def build_model(self, model: torch.nn.Module | ModelFactory | None = None) -> torch.nn.Module:
        """The module to train, on the trainer's device: ``model`` itself, ``model(in_dim, num_classes)`` built
        after seeding, or (``None``) a fresh seeded ``config.model`` from the aggregator registry."""
        if isinstance(model, torch.nn.Module):
            return model.to(self.device)
        torch.manual_seed(self.config.seed)
        if model is not None:
            built = model(self.in_dim, self.num_classes)
            if not isinstance(built, torch.nn.Module):
                raise InvalidArgumentError(f"model factory {getattr(model, '__name__', model)!r} returned "
                                           f"{type(built).__name__}, not a torch.nn.Module")  # fmt: skip
            return built.to(self.device)
        from milcore.models import create_aggregator

        built = create_aggregator(self.config.model, in_dim=self.in_dim, num_classes=self.num_classes,
                                  **self.config.model_args)  # fmt: skip
        return built.to(self.device)

    def _name(self, model: torch.nn.Module) -> str:
        return getattr(model, "aggregator_name", None) or type(model).__name__

    def _optimizer(self, model: torch.nn.Module, extra: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad] + extra
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.config.lr, momentum=0.9, weight_decay=self.config.weight_decay)
        # the fused kernel (one pass over all parameters) when every parameter is a float tensor on CPU or CUDA:
        # faster steps than the default per-tensor loop on CPU (benchmarks/README.md, issue 18 speed), the same
        # update up to float rounding
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=fused or None)

    # ------------------------------------------------------------------ training
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
        val: FeatureStore,
        *,
        model: torch.nn.Module | ModelFactory | None = None,
        state_path: str | Path | None = None,
        desc: str = "train",
        log_dir: str | Path | None = None,
    ) -> tuple[torch.nn.Module, FitResult]:
        """Train, keeping the best epoch by the validation monitor.

        Args:
            train: labelled training bags.
            val: labelled validation bags (early stopping and selection only).
            model: the module to train (any ``nn.Module`` honouring the MILOutput contract), a factory
                ``(in_dim, num_classes) -> module`` called after seeding, or ``None`` for ``config.model``
                from the registry.
            state_path: a file to save the resumable state to after every epoch (resumed if present).
            desc: progress-bar label.
            log_dir: TensorBoard event folder, used when ``config.tensorboard`` is set.

        Returns:
            The model loaded with the best weights, and the :class:`FitResult`.

        Raises:
            UserError: a store without labels; InvalidArgumentError: the module breaks the MILOutput
                contract (named on the first batch).
        """
        from milcore.models.base import EpochContext
        from milcore.models.registry import aggregator_needs, control_class_of

        cfg = self.config
        self.use_deterministic_algorithms()
        y_train = train.require_labels("training")
        y_val = val.require_labels("validation")
        model = self.build_model(model)
        if cfg.input_norm == "standardize":
            mean, std = train.moments()
            # a near-constant feature (dead channel, or one only rare cells use) is centred but not blown up
            std = np.maximum(std, STD_FLOOR * np.median(std))
            attach_input_norm(model, torch.from_numpy(mean), torch.from_numpy(std))
        weights = (class_weights(torch.from_numpy(y_train), self.num_classes) if cfg.class_weighting == "balanced"
                   else torch.ones(self.num_classes)).to(self.device)  # fmt: skip
        bel = self._bel(model)
        optimizer = self._optimizer(model, list(bel.parameters()) if bel is not None else [])
        amp = autocast_dtype(cfg.amp, self.device)
        step = OptimizerStep(model, optimizer, cfg.grad_clip, amp, self.device)
        y_train_t = torch.from_numpy(y_train)
        history: list[dict[str, float]] = []
        best = {"score": math.inf, "epoch": -1, "state": copy.deepcopy(model.state_dict())}
        start_epoch, bad_epochs = 0, 0
        if state_path is not None and Path(state_path).exists():
            start_epoch, bad_epochs, history, best = self._resume(Path(state_path), model, optimizer, bel, step)
        needs = aggregator_needs(model).hooks  # declared by the model (any nn.Module: none)
        x_dtype = input_dtype(model, amp)
        normal_class = control_class_of(model)
        board = _tensorboard(log_dir) if cfg.tensorboard else None
        bar = progress(total=cfg.epochs, desc=desc, unit="epoch", initial=start_epoch)
        stopped, checked, validate_s = False, False, 0.0
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            ctx = EpochContext(epoch, self._control_sampler(train, y_train, normal_class, epoch, model)
                               if "control_instances" in needs else None)  # fmt: skip
            hook = getattr(model, "on_epoch_start", None)  # aggregators have it; a plain nn.Module need not
            if hook is not None:
                hook(ctx)
            total, count = 0.0, 0
            order = epoch_order(y_train, self.num_classes, cfg.sampler == "balanced",
                                np.random.default_rng([cfg.seed, epoch, 17]))  # fmt: skip
            for batch in train.batches(order, cfg.batch_instances, cfg.max_bag_instances,
                                       seed=cfg.seed * 100_003 + epoch, num_workers=0 if train.in_memory
                                       else cfg.num_workers, pin_memory=self.device.type == "cuda",
                                       keep=1.0 - cfg.instance_dropout, dtype=x_dtype):  # fmt: skip
                b = batch.to(self.device, non_blocking=True)
                y = y_train_t[positions(batch)].to(self.device)
                with autocast(self.device, amp):
                    out = forward(model, b.x, b.ptr, b.coords, labels=y)
                if not checked:  # a module that breaks the contract fails here, in one line
                    check_output_contract(out, b.ptr, self.num_classes, where=self._name(model))
                    checked = True
                nonempty = (b.ptr[1:] > b.ptr[:-1])
                loss = bag_cross_entropy(out.logits[nonempty], y[nonempty], weights)
                for aux in out.aux_losses.values():
                    loss = loss + aux.float()
                if bel is not None:
                    loss = loss + cfg.bel_weight * bel(out.embedding.float()[nonempty], y[nonempty])
                step(loss)
                total += float(loss.detach()) * batch.num_bags
                count += batch.num_bags
            t_val = time.perf_counter()
            preds = self.predict(model, val, with_attention=False)
            validate_s += time.perf_counter() - t_val
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
                self._save_state(Path(state_path), epoch + 1, bad_epochs, history, best, model, optimizer, bel, step)
            if bad_epochs >= cfg.patience and epoch + 1 >= cfg.min_epochs:
                stopped = True
                break
        bar.close()
        if board is not None:
            board.close()
        model.load_state_dict(best["state"])
        state = {k: v.detach().cpu().clone() for k, v in best["state"].items()}
        return model, FitResult(state, int(best["epoch"]), history, stopped, validate_s)

    def _bel(self, model: torch.nn.Module) -> torch.nn.Module | None:
        if self.config.bel_weight <= 0:
            return None
        from milcore.losses import BagEmbeddingLoss

        with torch.no_grad():
            probe = forward(model, torch.zeros(1, self.in_dim, device=self.device),
                            torch.tensor([0, 1], device=self.device))  # fmt: skip
        check_output_contract(probe, torch.tensor([0, 1]), self.num_classes, where=self._name(model))
        return BagEmbeddingLoss(num_classes=self.num_classes, dim=probe.embedding.shape[1]).to(self.device)

    # ------------------------------------------------------------------ resume
    @staticmethod
    def _save_state(path: Path, next_epoch: int, bad_epochs: int, history: list, best: dict,
                    model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    bel: torch.nn.Module | None, step: OptimizerStep) -> None:  # fmt: skip
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
            "scaler": step.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @staticmethod
    def _resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                bel: torch.nn.Module | None, step: OptimizerStep) -> tuple[int, int, list, dict]:  # fmt: skip
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if bel is not None and payload["bel"]:
            bel.load_state_dict(payload["bel"])
        step.load_state_dict(payload.get("scaler") or {})
        torch.set_rng_state(payload["torch_rng"])
        log.info("resuming %s at epoch %d", path, payload["next_epoch"])
        best = {"score": payload["best_score"], "epoch": payload["best_epoch"], "state": payload["best_state"]}
        return int(payload["next_epoch"]), int(payload["bad_epochs"]), list(payload["history"]), best

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, store: FeatureStore, with_attention: bool = True) -> ModelOutputs:
        """Logits, per-cell attention and embeddings for every bag of ``store`` (all cells, no sub-sampling).

        The first batch is checked against the MILOutput contract (one segment sum)."""
        model.eval()
        amp = autocast_dtype(self.config.amp, self.device)
        n = len(store)
        logits: list[np.ndarray | None] = [None] * n
        emb: list[np.ndarray | None] = [None] * n
        att: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * n
        scores: dict[str, list[np.ndarray]] = {}
        order, checked = np.arange(n), False
        for batch in store.batches(order, self.config.batch_instances, 0, num_workers=0 if store.in_memory
                                   else self.config.num_workers, dtype=input_dtype(model, amp)):  # fmt: skip
            b = batch.to(self.device, non_blocking=True)
            with autocast(self.device, amp):
                out = forward(model, b.x, b.ptr, b.coords)
            if not checked:  # shapes and attention sums; non-finite outputs are the caller's to report per bag
                check_output_contract(out, b.ptr, self.num_classes, where=self._name(model), finite=False)
                checked = True
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
        return ModelOutputs(np.stack(logits) if n else np.zeros((0, self.num_classes)), att,
                           np.stack(emb) if n else np.zeros((0, 0), dtype=np.float32), scores)  # fmt: skip
