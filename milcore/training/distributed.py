"""One fold trained with DistributedDataParallel across torchrun processes (NCCL on GPUs, gloo on CPUs).

Every rank builds the same seeded model, input standardisation and epoch order as the single-process
:class:`~milcore.training.trainer.Trainer`. Each *global* batch is the one the single process would
form (:func:`~milcore.data.store.budget_batches` under ``batch_instances``); :class:`DistributedBagSampler`
splits it over the ranks balancing instance counts (bags differ 100x in size, so an equal number of
bags per rank would leave most ranks waiting). Each rank's loss is its bags' share of the *global*
class-weighted cross-entropy (weights summed over the whole global batch, known to every rank from the
labels), times the world size because DDP averages gradients: the summed gradient is the single
process's, so training matches it up to floating-point reduction order. Validation and test bags are
predicted in balanced shares and gathered, so early stopping, the temperature and the test outputs are
the same on every rank; only rank 0 writes (checkpoints are the caller's, on rank 0).

Not supported (refused in one line): the Bag Embedding Loss, models with epoch hooks that sample
control cells (AMiL), fp16 loss scaling. Auxiliary losses a model returns are weighted by each rank's
share of the batch's bags (exact for per-bag means). Random draws inside a model (dropout, instance
masking) come from each rank's own generator, so such models match single-process training in
distribution rather than to the digit.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from feature_cache.devices import resolve_device
from feature_cache.distributed import RankInfo, backend_for, balanced_assignment, detect_rank, process_group
from feature_cache.errors import InvalidArgumentError
from milcore.data.store import budget_batches
from milcore.losses import class_weights
from milcore.metrics.calibration import fit_temperature, softmax
from milcore.metrics.classification import balanced_accuracy
from milcore.models.input_norm import attach_input_norm
from milcore.training.config import TrainConfig
from milcore.training.loop import OptimizerStep, autocast, autocast_dtype, epoch_order, input_dtype
from milcore.training.trainer import STD_FLOOR, ModelOutputs, Trainer, positions

if TYPE_CHECKING:
    from milcore.data.splits import Fold
    from milcore.data.store import FeatureStore
    from milcore.training.fold import FoldResult

log = logging.getLogger(__name__)


class DistributedBagSampler:
    """The single process's batches, each split over the ranks with balanced instance counts.

    Args:
        sizes: (B,) instances per bag of the training store.
        batch_instances: instance budget of one global batch (as :class:`Trainer` uses it).
        rank: this process's rank.
        cap: per-bag sub-sampling cap counted instead of the size (0 = none).
    """

    def __init__(self, sizes: np.ndarray, batch_instances: int, rank: RankInfo, cap: int = 0) -> None:
        self.sizes, self.budget, self.rank, self.cap = np.asarray(sizes), batch_instances, rank, cap

    def batches(self, order: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each global batch of ``order``: (all its bag positions, this rank's share)."""
        out = []
        for group in budget_batches(self.sizes, order, self.budget, self.cap):
            sizes = [(str(j), max(int(self.sizes[p]), 1)) for j, p in enumerate(group)]
            share = balanced_assignment(sizes, self.rank.world_size)[self.rank.rank]
            out.append((group, group[[int(j) for j in share]] if share else group[:0]))
        return out


def _check_supported(config: TrainConfig, model: torch.nn.Module, device: torch.device) -> None:
    from milcore.models.registry import aggregator_needs

    if config.bel_weight > 0:
        raise InvalidArgumentError("distributed training: --bel-weight is not supported across processes (its class "
                                   "centres are per process); train this model in one process")  # fmt: skip
    if aggregator_needs(model).hooks:
        raise InvalidArgumentError(f"distributed training: {type(model).__name__} samples control cells before each "
                                   "epoch (an epoch hook), not supported across processes")  # fmt: skip
    if autocast_dtype(config.amp, device) == torch.float16:
        raise InvalidArgumentError("distributed training: --amp fp16 (loss scaling) is not supported; use bf16 or off")


def predict_gathered(trainer: Trainer, model: torch.nn.Module, store: FeatureStore, rank: RankInfo,
                     with_attention: bool = True) -> ModelOutputs:  # fmt: skip
    """Every bag of ``store`` predicted in balanced shares by the ranks and gathered on all of them."""
    dist = torch.distributed
    share = balanced_assignment([(b, int(n)) for b, n in zip(store.bag_ids, store.sizes, strict=True)],
                                rank.world_size)[rank.rank]  # fmt: skip
    mine = trainer.predict(model, store.view(share), with_attention=with_attention) if share else None
    parts: list[Any] = [None] * rank.world_size
    dist.all_gather_object(parts, (share, mine))
    index = {b: i for i, b in enumerate(store.bag_ids)}
    n = len(store)
    logits = np.zeros((n, trainer.num_classes))
    emb: np.ndarray | None = None
    att: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * n
    scores: dict[str, list[np.ndarray]] = {}
    for ids, out in parts:
        if out is None:
            continue
        if emb is None:
            emb = np.zeros((n, out.embedding.shape[1]), dtype=out.embedding.dtype)
        for j, bag in enumerate(ids):
            i = index[bag]
            logits[i], emb[i] = out.logits[j], out.embedding[j]
            att[i] = out.attention[j]
            for k, v in out.instance_scores.items():
                scores.setdefault(k, [np.zeros(0, dtype=np.float32)] * n)[i] = v[j]
    return ModelOutputs(logits, att, emb if emb is not None else np.zeros((n, 0), dtype=np.float32), scores)


def fit_ddp(config: TrainConfig, train: FeatureStore, val: FeatureStore, *, rank: RankInfo | None = None,
            desc: str = "train") -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """Train ``config.model`` with DDP (see the module docstring); every rank returns the same best model.

    Joins the default process group unless the caller has (and then leaves it on return:
    :func:`~feature_cache.distributed.process_group`).

    Returns:
        The model (unwrapped, best validation epoch loaded) and ``best_epoch``, ``history``,
        ``stopped_early``, ``validate_seconds``.
    """
    rank = rank or detect_rank()
    with process_group(backend_for(resolve_device(config.device)), rank.local_rank):
        return _fit_ddp(config, train, val, rank, desc)


def _fit_ddp(config: TrainConfig, train: FeatureStore, val: FeatureStore, rank: RankInfo,
             desc: str) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    dist = torch.distributed
    trainer = Trainer(config, train.dim, train.num_classes)
    device = trainer.device
    if device.type == "cuda":
        device = torch.device(f"cuda:{rank.local_rank}")
        trainer.device = device
        torch.cuda.set_device(device)
    y_train, y_val = train.require_labels("training"), val.require_labels("validation")
    model = trainer.build_model(None)
    _check_supported(config, model, device)
    if config.input_norm == "standardize":
        mean, std = train.moments()
        std = np.maximum(std, STD_FLOOR * np.median(std))
        attach_input_norm(model, torch.from_numpy(mean), torch.from_numpy(std))
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    weights = (class_weights(torch.from_numpy(y_train), trainer.num_classes) if config.class_weighting == "balanced"
               else torch.ones(trainer.num_classes)).to(device)  # fmt: skip
    optimizer = trainer._optimizer(ddp.module, [])
    amp = autocast_dtype(config.amp, device)
    step = OptimizerStep(ddp, optimizer, config.grad_clip, amp, device)
    sampler = DistributedBagSampler(train.sizes, config.batch_instances, rank, config.max_bag_instances)
    y_all = torch.from_numpy(y_train)
    history: list[dict[str, float]] = []
    best = {"score": math.inf, "epoch": -1, "state": copy.deepcopy(model.state_dict())}
    bad, stopped, validate_s = 0, False, 0.0
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        ddp.train()
        order = epoch_order(y_train, trainer.num_classes, config.sampler == "balanced",
                            np.random.default_rng([config.seed, epoch, 17]))  # fmt: skip
        total = torch.zeros(2, dtype=torch.float64)  # (loss x bags, bags) of this rank
        for i, (group, share) in enumerate(sampler.batches(order)):
            nonempty_all = train.sizes[group] > 0
            w_global = float(weights.cpu()[y_all[group][torch.from_numpy(nonempty_all)]].sum())
            if len(share):
                rng = np.random.default_rng([config.seed * 100_003 + epoch, i, rank.rank])
                batch = train.gather(share, config.max_bag_instances, rng if config.max_bag_instances or
                                     config.instance_dropout else None, 1.0 - config.instance_dropout,
                                     input_dtype(model, amp))  # fmt: skip
                b = batch.to(device)
                y = y_all[positions(batch)].to(device)
                with autocast(device, amp):
                    out = ddp(b.x, b.ptr, coords=b.coords, labels=y)  # a registered aggregator takes both
                keep = b.ptr[1:] > b.ptr[:-1]
                ce = F.cross_entropy(out.logits[keep].float(), y[keep].long(), weight=weights, reduction="none")
                loss = ce.sum() / max(w_global, 1e-12) * rank.world_size
                for aux in out.aux_losses.values():
                    loss = loss + aux.float() * (len(share) / len(group)) * rank.world_size
                total[0] += float(ce.detach().sum()) / max(w_global, 1e-12) * len(group)
            else:  # no bag for this rank in this batch: zero gradients, but take part in the all-reduce
                loss = sum(p.sum() for p in ddp.parameters()) * 0.0
            total[1] += len(group) / rank.world_size
            step(loss)
        dist.all_reduce(total)
        t_val = time.perf_counter()
        preds = predict_gathered(trainer, ddp.module, val, rank, with_attention=False)
        validate_s += time.perf_counter() - t_val
        val_loss = float(F.cross_entropy(torch.from_numpy(preds.logits).float(), torch.from_numpy(y_val)))
        val_ba = balanced_accuracy(y_val, preds.logits.argmax(1), trainer.num_classes)
        history.append({"epoch": epoch, "train_loss": float(total[0] / max(total[1], 1)), "val_loss": val_loss,
                        "val_balanced_accuracy": val_ba, "seconds": time.perf_counter() - t0})  # fmt: skip
        score = val_loss if config.monitor == "val_loss" else -val_ba
        if score < best["score"] - 1e-6:
            best = {"score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            bad = 0
        else:
            bad += 1
        log.debug("%s rank %d epoch %d: %s", desc, rank.rank, epoch, history[-1])
        if bad >= config.patience and epoch + 1 >= config.min_epochs:
            stopped = True
            break
    model.load_state_dict(best["state"])
    return model, {"best_epoch": int(best["epoch"]), "history": history, "stopped_early": stopped,
                   "validate_seconds": validate_s, "trainer": trainer}  # fmt: skip


def fit_fold_ddp(config: TrainConfig, data: FeatureStore, fold: Fold, *, rank: RankInfo | None = None,
                 desc: str | None = None) -> FoldResult:  # fmt: skip
    """:func:`~milcore.training.fold.fit_fold` across torchrun processes: the same :class:`FoldResult` on every
    rank (test outputs gathered), equal to the single-process one up to floating-point reduction order.
    Joins the default process group unless the caller has (and then leaves it on return)."""
    rank = rank or detect_rank()
    with process_group(backend_for(resolve_device(config.device)), rank.local_rank):
        return _fit_fold_ddp(config, data, fold, rank, desc)


def _fit_fold_ddp(config: TrainConfig, data: FeatureStore, fold: Fold, rank: RankInfo,
                  desc: str | None) -> FoldResult:  # fmt: skip
    from milcore.training.fold import FoldResult

    if data.labels is None:
        data.require_labels("fit_fold")
    from milcore.models import aggregator_needs

    if aggregator_needs(config.model).coords and not data.with_coords:
        data = data.with_coordinates()
    train, val, test = data.view(fold.train), data.view(fold.val), data.view(fold.test)
    t0 = time.perf_counter()
    model, fit = fit_ddp(config, train, val, rank=rank, desc=desc or f"fold {fold.index}")
    t1 = time.perf_counter()
    trainer = fit["trainer"]
    temperature = fit_temperature(predict_gathered(trainer, model, val, rank, with_attention=False).logits, val.labels)
    t2 = time.perf_counter()
    out = predict_gathered(trainer, model, test, rank)
    labels = test.labels if test.labels is not None else np.full(len(test), -1, dtype=np.int64)
    seconds = {"fit": t1 - t0, "validate": fit["validate_seconds"], "calibrate": t2 - t1,
               "test": time.perf_counter() - t2}  # fmt: skip
    return FoldResult(fold, model, float(temperature), fit["best_epoch"], fit["history"], fit["stopped_early"], out,
                      softmax(out.logits, temperature), labels, seconds, trainer)  # fmt: skip
