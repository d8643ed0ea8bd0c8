"""Supervised encoder training on labelled single cells (``milcore encoder train --mode supervised``).

The backbone (``compact_cnn`` from scratch, or ``efficientnet_lite0`` fine-tuned from ImageNet) and a
linear classification head are trained with cross-entropy on augmented crops (:mod:`.augment`),
class-balanced (a balanced sampler by default, or class-weighted loss), validated on held-out crops
(the data's own ``val`` split when it has one, else a stratified ``val_fraction``), with early
stopping on validation balanced accuracy and the best epoch's weights kept. The data's ``test`` split,
when there is one, is never used for training or selection; the final model's accuracy on it is
reported in the card.

With ``attributes`` (columns of a CSV, e.g. the WBCAtt-style attributes a hematologist uses to describe a
cell: ``nc_ratio``, ``chromatin``, ``granule_type``, ``auer_rods``; Tsutsui et al., WBCAtt), every attribute
gets a linear head of its own on the same features and its cross-entropy joins the class loss
(``attribute_weight`` times their mean; each balanced over the values the loss sees), so the features must
carry what a cell-type label alone does not ask for: a cell type told apart by its cytoplasm need not
encode its Auer rods. Selection then maximises the mean of the class balanced accuracy and the
attributes' mean balanced accuracy.

Writes ``encoder.safetensors`` (the backbone, for ``milcore extract --encoder BACKBONE --weights``),
``head.safetensors`` (the classifier), ``attributes.safetensors`` (the attribute heads, when trained) and
``encoder.json`` (recipe, data fingerprint, classes, attribute values, metrics, history, training time with
the load average). Resumable (:mod:`.loop`).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feature_cache.config import option
from feature_cache.encoders.train_config import NOT_RECIPE, EncoderTrainConfig

if TYPE_CHECKING:  # numpy is imported where used: the CLI reads the config without loading numpy
    import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisedConfig(EncoderTrainConfig):
    """One supervised training run (the shared settings: :class:`~.train_config.EncoderTrainConfig`).

    Attributes:
        balance: ``sampler`` (classes drawn equally often), ``loss`` (class-weighted loss) or ``none``.
        label_smoothing: cross-entropy label smoothing.
        ema: decay of an exponential moving average of the weights, updated every step, that is validated
            and kept instead of the raw weights (0: off; 0.999 is usual).
        tta: validate and test on the mean features of the 8 rotations/flips of each crop (``compact_cnn``);
            recorded in the weights file, so that extraction averages the same way by default.
        attributes: CSV columns trained as categorical cell attributes beside the label (one linear head
            each; an empty value is unknown and not trained on), e.g. nc_ratio,chromatin,auer_rods.
        attribute_weight: weight of the attributes' mean cross-entropy beside the class loss.
    """

    balance: str = option("sampler", choices=("sampler", "loss", "none"))
    label_smoothing: float = option(0.0, low=0, high=0.5)
    ema: float = option(0.0, low=0, high=0.9999)
    tta: bool = False
    attributes: tuple[str, ...] = ()
    attribute_weight: float = option(1.0, low=0, low_open=True)

    def validate(self) -> None:
        """``tta`` is a ``compact_cnn`` option; attributes are named once each."""
        from feature_cache.errors import InvalidArgumentError

        if self.tta and self.backbone != "compact_cnn":
            raise InvalidArgumentError(f"tta: test-time averaging is a compact_cnn option, not {self.backbone}'s")
        twice = sorted({a for a in self.attributes if self.attributes.count(a) > 1})
        if twice:
            raise InvalidArgumentError(f"attributes: {', '.join(twice)} named more than once")


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        weights: the backbone's weights file.
        card: the card (as written to ``encoder.json``).
    """

    weights: Path
    card: dict[str, Any]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``: ``fraction`` of each class (at least one crop each) held out."""
    import numpy as np

    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        k = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        val.extend(idx[:k].tolist())
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def to_tensor(cells: Any, size: int, resample: str = "bilinear"):
    """Every crop resized (shorter side, centre crop) to (n, 3, size, size) uint8."""
    import numpy as np
    import torch

    from feature_cache.encoders.base import ResizeCrop

    t = ResizeCrop(size, resample)
    return torch.stack([t(np.asarray(img)) for img in cells.images]) if len(cells) else torch.empty(0, 3, size, size,
                                                                                                     dtype=torch.uint8)


def attribute_weights(codes: np.ndarray, n_values: int, draw: np.ndarray | None) -> np.ndarray:
    """Balanced cross-entropy weights of one attribute's values: (n_values,).

    Balanced over what the loss sees: each value's share of the known training crops, each crop counted by
    its sampling probability (``draw``: the class-balancing sampler's weights; ``None``: every crop alike),
    so that a rare value (an Auer rod in 1.5 % of the cells) weighs as much as a common one. A value absent
    from the training crops gets weight 1 (it is never a target).
    """
    import numpy as np

    p = np.ones(len(codes)) if draw is None else np.asarray(draw, dtype=np.float64)
    known = codes >= 0
    mass = np.bincount(codes[known], weights=p[known], minlength=n_values)  # (n_values,)
    present = mass > 0
    out = np.ones(n_values)
    out[present] = mass[present].sum() / (present.sum() * mass[present])
    return out


def classify_metrics(y: np.ndarray, prob: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and cross-entropy of predicted probabilities."""
    import numpy as np
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    pred = prob.argmax(1)
    loss = float(-np.log(np.clip(prob[np.arange(len(y)), y], 1e-12, 1)).mean())
    labels = list(range(n_classes))
    with warnings.catch_warnings():  # a class predicted but absent from y (a rare attribute value): defined as usual
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(y, pred))
    return {"loss": loss, "accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": balanced,
            "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))}  # fmt: skip


def _prepare(config: SupervisedConfig):
    """Read and check the data; split it (nothing written)."""
    import numpy as np

    from feature_cache.encoders.backbones import MIN_INPUT
    from feature_cache.encoders.celldata import check_sizes, read_cells
    from feature_cache.errors import UserError

    cells = read_cells(config.data, labelled=True, attributes=config.attributes)
    has_split = (cells.split != "").any()
    if has_split:
        train, val = cells.of_split("train"), cells.of_split("val")
        if len(train) == 0 or len(val) == 0:
            raise UserError(f"{config.data}: its split column needs both train and val crops "
                            f"(found {len(train)} train, {len(val)} val)")  # fmt: skip
    else:
        tr, va = stratified_split(cells.labels, config.val_fraction, config.seed)
        train, val = cells.subset(tr), cells.subset(va)
    if config.max_cells and len(train) > config.max_cells:
        _, keep = stratified_split(train.labels, config.max_cells / len(train), config.seed + 1)
        train = train.subset(keep)  # a stratified sample of about max_cells crops
    present = np.unique(train.labels)
    if len(present) < 2:
        raise UserError(f"{config.data}: the training part holds a single class ({cells.classes[present[0]]})")
    for a, codes in train.attributes.items():
        seen, times = np.unique(codes[codes >= 0], return_counts=True)
        if len(seen) > 2 and len(seen) > (times.sum() + 1) // 2:  # most values seen once: an id or a measurement
            raise UserError(f"{config.data}: attribute {a} has {len(seen)} distinct values in {times.sum()} training "
                            "crops; an attribute head needs a categorical column (values shared by cells)")  # fmt: skip
        if len(seen) < 2:
            what = f"only {cells.attribute_values[a][seen[0]]!r}" if len(seen) else "no value"
            raise UserError(f"{config.data}: attribute {a} has {what} in the training part; an attribute head needs "
                            "at least two values")  # fmt: skip
    check_sizes(cells, config.image_size, config.max_upscale, MIN_INPUT[config.backbone])
    test = cells.of_split("test") if has_split and (cells.split == "test").any() else None
    return cells, train, val, test


def train_supervised(config: SupervisedConfig) -> TrainResult:
    """Train (or resume) a supervised cell encoder; see the module docstring.

    Raises:
        UserError: bad data (missing, corrupt, 16-bit or too-small crops, a single class), a device
            that does not exist, or a run folder holding another recipe; all checked before writing.
    """
    import numpy as np
    import torch
    from torch.nn import functional as F

    from feature_cache.devices import resolve_device
    from feature_cache.encoders.augment import Augment
    from feature_cache.encoders.backbones import build_backbone
    from feature_cache.encoders.card import save_weights, write_card
    from feature_cache.encoders.loop import RunFolder, fit, load_average, precision_for, warmup_cosine

    device = resolve_device(config.device, option="--device")
    cells, train, val, test = _prepare(config)
    recipe = {k: v for k, v in config.to_dict().items() if k not in NOT_RECIPE}
    recipe.update(mode="supervised", data_fingerprint=cells.fingerprint, classes=list(cells.classes))
    if config.attributes:
        recipe["attribute_values"] = {a: list(v) for a, v in cells.attribute_values.items()}
    else:  # the recipe of a run without attributes is the one written before they existed (it resumes)
        recipe.pop("attributes"), recipe.pop("attribute_weight")
    run = RunFolder(config.out, recipe, config.overwrite)
    saved = run.check()
    if saved is not None and saved["loop"]["finished"] and run.weights.exists():
        from feature_cache.encoders.card import read_card

        log.info("%s: already trained with this recipe; nothing to do", run.out)
        return TrainResult(run.weights, read_card(run.weights) or {})
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.backbone, config.image_size, config.width, config.pretrained)
    if config.tta:
        backbone.options["tta"] = True  # in the weights header: extraction averages by default too
    n_classes = len(cells.classes)
    head = torch.nn.Linear(backbone.dim, n_classes)
    values = cells.attribute_values
    attr_heads = torch.nn.ModuleDict({a: torch.nn.Linear(backbone.dim, len(v)) for a, v in values.items()})
    prec = precision_for(device, config.amp, config.channels_last)
    memory = torch.channels_last if prec.channels_last else torch.contiguous_format
    model = torch.nn.Sequential(backbone.norm, backbone.net).to(device, memory_format=memory)
    head, attr_heads = head.to(device), attr_heads.to(device)
    augment = Augment(config.augment)
    x_train, y_train = to_tensor(train, config.image_size), torch.as_tensor(train.labels)
    x_val = to_tensor(val, config.image_size)
    counts = np.bincount(train.labels, minlength=n_classes).astype(np.float64)
    weight = None
    if config.balance == "loss":
        weight = torch.as_tensor(counts.sum() / np.maximum(counts, 1) / n_classes, dtype=torch.float32).to(device)
    draw = torch.as_tensor(1.0 / np.maximum(counts, 1))[y_train] if config.balance == "sampler" else None
    a_train = {a: torch.as_tensor(c) for a, c in train.attributes.items()}
    a_weight = {a: torch.as_tensor(attribute_weights(c, len(values[a]), None if draw is None else draw.numpy()),
                                   dtype=torch.float32).to(device) if config.balance != "none" else None
                for a, c in train.attributes.items()}  # fmt: skip
    params = [*model.parameters(), *head.parameters(), *attr_heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = max(1, len(x_train) // config.batch_size)
    scheduler = warmup_cosine(optimizer, steps * config.epochs, steps * config.warmup_epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=prec.scaler)
    gen = torch.Generator().manual_seed(config.seed)
    # backbone, class head, attribute heads (none: no state, so a run without attributes saves what it did before)
    parts = torch.nn.ModuleList([model, head, attr_heads])
    # the averaged copy is validated and kept (all parts together; batch-norm statistics averaged too)
    ema = (torch.optim.swa_utils.AveragedModel(parts, use_buffers=True,
                                               multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema))
           if config.ema else None)  # fmt: skip
    run.start()

    def attribute_loss(feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The attributes' mean cross-entropy over the crops of the batch whose value is known."""
        losses = []
        for a, layer in attr_heads.items():
            yb = a_train[a][idx].to(device)  # (B,)
            if (yb >= 0).any():
                losses.append(F.cross_entropy(layer(feats).float(), yb, weight=a_weight[a], ignore_index=-1))
        return torch.stack(losses).mean() if losses else feats.new_zeros((), dtype=torch.float32)

    def train_one(epoch: int) -> float:
        parts.train()
        if draw is not None:
            order = torch.multinomial(draw, steps * config.batch_size, replacement=True, generator=gen)
        else:
            order = torch.randperm(len(x_train), generator=gen)[: steps * config.batch_size]
        total = 0.0
        for s in range(steps):
            idx = order[s * config.batch_size : (s + 1) * config.batch_size]
            xb = augment(x_train[idx].to(device), gen).contiguous(memory_format=memory)  # (B, 3, S, S)
            yb = y_train[idx].to(device)
            with prec.context(device):
                feats = model(xb)  # (B, D)
                loss = F.cross_entropy(head(feats).float(), yb, weight=weight, label_smoothing=config.label_smoothing)
                if len(attr_heads):
                    loss = loss + config.attribute_weight * attribute_loss(feats, idx)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(parts)
            total += float(loss.detach())
        return total / steps

    def probabilities(x: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Class probabilities (n, C) and each attribute's value probabilities (n, V)."""
        trained = ema.module if ema is not None else parts
        trained.eval()
        body, classifier, attr = trained[0], trained[1], trained[2]
        if config.tta:  # the features averaged, then the (linear) heads: as extraction with tta computes them
            from feature_cache.encoders.compact import DihedralMean

            norm, features = body  # (norm, backbone)
            body = torch.nn.Sequential(norm, DihedralMean(features))
        out: list[torch.Tensor] = []
        attr_out: dict[str, list[torch.Tensor]] = {a: [] for a in attr}
        with torch.inference_mode():  # float32, as the registered encoder extracts
            for s in range(0, len(x), 512):
                xb = x[s : s + 512].to(device).float().contiguous(memory_format=memory)
                feats = body(xb).float()  # (b, D)
                out.append(torch.softmax(classifier(feats).float(), 1).cpu())
                for a, layer in attr.items():
                    attr_out[a].append(torch.softmax(layer(feats).float(), 1).cpu())
        return torch.cat(out).numpy(), {a: torch.cat(v).numpy() for a, v in attr_out.items()}

    def evaluate(part: Any, x: torch.Tensor, prefix: str) -> dict[str, float]:
        """Class metrics, and per attribute (on the crops whose value is known) with their mean balanced
        accuracy and macro-F1."""
        prob, attr_prob = probabilities(x)
        m = {f"{prefix}_{k}": v for k, v in classify_metrics(part.labels, prob, n_classes).items()}
        if attr_prob:
            per = {}
            for a, p in attr_prob.items():
                known = part.attributes[a] >= 0
                per[a] = classify_metrics(part.attributes[a][known], p[known], len(values[a])) if known.any() else {}
                m.update({f"{prefix}_attr_{a}_{k}": v for k, v in per[a].items() if k != "loss"})
            scored = [v for v in per.values() if v]
            if scored:  # none: no crop of this part has a known attribute value; selection uses the class alone
                m[f"{prefix}_attribute_balanced_accuracy"] = float(np.mean([v["balanced_accuracy"] for v in scored]))
                m[f"{prefix}_attribute_macro_f1"] = float(np.mean([v["macro_f1"] for v in scored]))
        return m

    def validate() -> dict[str, float]:
        return evaluate(val, x_val, "val")

    t0 = time.perf_counter()
    log.info("training %s on %d crops (%d classes), validating on %d; %d steps per epoch on %s",
             config.backbone, len(train), n_classes, len(val), steps, device)  # fmt: skip
    def score(m: dict[str, float]) -> float:  # balanced accuracy (with attributes: the mean of class and attributes)
        ba = m["val_balanced_accuracy"]
        if "val_attribute_balanced_accuracy" in m:
            ba = (ba + m["val_attribute_balanced_accuracy"]) / 2
        return ba - 1e-6 * m["val_loss"]  # the loss only breaks ties

    modules = {"model": model, "head": head, **({"attributes": attr_heads} if len(attr_heads) else {}),
               **({"ema": ema} if ema is not None else {})}  # fmt: skip
    # the log line leaves the per-attribute metrics to the history
    state = fit(run, saved, modules, optimizer, scheduler, gen, config.epochs, config.patience, train_one, validate,
                score, min_epochs=config.stop_from, logged=lambda k: "_attr_" not in k)  # fmt: skip
    if ema is not None:  # the averaged weights are the ones validated, kept and written
        averaged = ema.module
        model.load_state_dict(averaged[0].state_dict())
        head.load_state_dict(averaged[1].state_dict())
        attr_heads.load_state_dict(averaged[2].state_dict())
    metrics = {"best_epoch": state.best_epoch, **state.history[state.best_epoch - 1]} if state.history else {}
    if test is not None:
        metrics.update(evaluate(test, to_tensor(test, config.image_size), "test"))
    sha = save_weights(run.weights, backbone.weights_state(), config.backbone, backbone.options)
    save_weights(run.out / "head.safetensors", head.state_dict(), f"{config.backbone}:head", {"classes": n_classes})
    if len(attr_heads):
        save_weights(run.out / "attributes.safetensors", attr_heads.state_dict(), f"{config.backbone}:attributes",
                     {"attributes": {a: list(v) for a, v in values.items()}})  # fmt: skip
    card = {
        "mode": "supervised", "encoder": config.backbone, "weights": run.weights.name, "weights_sha256": sha,
        "options": backbone.options, "dim": backbone.dim, "classes": list(cells.classes), "recipe": recipe,
        "attributes": {a: list(v) for a, v in values.items()},
        "data": {"source": cells.source, "fingerprint": cells.fingerprint, "train": len(train), "val": len(val),
                 "test": 0 if test is None else len(test), "train_counts": train.counts()},
        "metrics": metrics, "history": state.history,
        "training": {"seconds": round(state.seconds, 1), "this_process_seconds": round(time.perf_counter() - t0, 1),
                     "epochs": state.epoch, "device": str(device), "load_average": load_average(),
                     "torch_threads": torch.get_num_threads()},
        "use": f"milcore extract --encoder {config.backbone} --weights {run.weights}",
    }  # fmt: skip
    write_card(run.weights, card)
    log.info("wrote %s (best epoch %d, val balanced accuracy %.4f%s)", run.weights, state.best_epoch,
             metrics.get("val_balanced_accuracy", float("nan")),
             f", test accuracy {metrics['test_accuracy']:.4f}" if "test_accuracy" in metrics else "")  # fmt: skip
    return TrainResult(run.weights, card)
