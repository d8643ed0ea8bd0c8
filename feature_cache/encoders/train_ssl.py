"""Self-supervised encoder training on unlabelled cells: SimCLR (``milcore encoder train --mode ssl``).

Why SimCLR rather than DINO-style self-distillation: at the sizes this engine trains on a CPU (tens of
thousands of 28-96 px crops, batches of a few hundred, tens of epochs) SimCLR has one network and one
loss with one temperature, and a batch of 256 already gives 510 negatives per positive pair; DINO adds
a momentum teacher, output centering, teacher/student temperature schedules and multi-crop, each a
knob whose mis-setting collapses the representation silently, and it was designed for ViTs trained
for hundreds of GPU-epochs (DinoBloom: 380k cells). For a cohort's own few thousand cells the simpler
objective is the safer default.

Each crop gives two views through the strong augmentations (:meth:`AugmentConfig.ssl`: rotation, flip,
zoom and shift, blur, HED stain jitter, brightness/contrast); the backbone's features go through a
two-layer projection head; the NT-Xent loss (:func:`nt_xent_loss`, written out: the library version
needs cubic memory in the batch) pulls the two views of a crop together against the other crops of the batch. The
projection head is dropped after training (its input, the backbone's pooled features, transfers better,
Chen et al. 2020). Early stopping (optional) watches the NT-Xent loss of held-out crops (the data's
``val`` split when it has one); labels, when the data has them, are never used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from feature_cache.config import option
from feature_cache.encoders.augment import AugmentConfig
from feature_cache.encoders.train_config import NOT_RECIPE, EncoderTrainConfig
from feature_cache.encoders.train_supervised import TrainResult, to_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSLConfig(EncoderTrainConfig):
    """One self-supervised (SimCLR) training run (the shared settings:
    :class:`~.train_config.EncoderTrainConfig`; labels in ``data`` are never read).

    Attributes:
        batch_size: crops per step (two views each: 2 x batch_size - 2 negatives per positive pair).
        patience: epochs without a lower held-out NT-Xent loss before stopping (0: train all epochs); the
            epoch with the lowest held-out loss is kept either way.
        augment: the view augmentations (stronger than supervised training's: :meth:`AugmentConfig.ssl`).
        temperature: NT-Xent temperature.
        proj_dim: projection head output size.
    """

    batch_size: int = option(256, low=4)
    patience: int = option(0, low=0)
    augment: AugmentConfig = field(default_factory=AugmentConfig.ssl)
    temperature: float = option(0.2, low=0.01, high=2.0)
    proj_dim: int = option(128, low=8)


def _prepare(config: SSLConfig):
    import numpy as np

    from feature_cache.encoders.backbones import MIN_INPUT
    from feature_cache.encoders.celldata import check_sizes, read_cells
    from feature_cache.errors import UserError

    cells = read_cells(config.data, labelled=False)
    rng = np.random.default_rng(config.seed)
    if (cells.split == "train").any():
        train = cells.of_split("train")
        val = cells.of_split("val") if (cells.split == "val").any() else None
    else:
        train = cells.subset(np.nonzero(cells.split != "test")[0]) if (cells.split == "test").any() else cells
        val = None
    if val is None:
        order = rng.permutation(len(train))
        k = max(1, round(len(train) * config.val_fraction))
        train, val = train.subset(np.sort(order[k:])), train.subset(np.sort(order[:k]))
    if config.max_cells and len(train) > config.max_cells:
        train = train.subset(np.sort(rng.permutation(len(train))[: config.max_cells]))
    if len(train) < 4:
        raise UserError(f"{config.data}: {len(train)} training crop(s); contrastive training needs at least 4")
    check_sizes(cells, config.image_size, config.max_upscale, MIN_INPUT[config.backbone])
    return cells, train, val


def projection_head(dim: int, out: int):
    """SimCLR's projection: Linear -> BatchNorm -> ReLU -> Linear."""
    from torch import nn

    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, out))


def nt_xent_loss(temperature: float):
    """The NT-Xent (normalised temperature-scaled cross-entropy) loss of SimCLR, ``loss(z, labels)``.

    ``z`` (2n, d) are L2-normalised projections; ``labels`` (2n,) give the two views of a crop the same
    label. Each row's positive is the other row with its label; the negatives are all other rows. The
    loss is the cross-entropy of the cosine similarities divided by ``temperature``, with a row's
    similarity to itself left out (Chen et al. 2020, eq. 1), averaged over the 2n rows.

    Hand-written (a few lines, O(n^2) memory): pytorch-metric-learning's ``NTXentLoss`` gives the same
    value (``tests/encoders/test_train_encoder.py``) but builds a (positive pairs x negative pairs) mask,
    O(n^3) memory: 2.5 GB and minutes per step at a batch of 256 on a CPU.
    """
    import torch
    from torch.nn import functional as F

    def loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sim = z @ z.T / temperature  # (2n, 2n)
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        sim = sim.masked_fill(eye, float("-inf"))
        same = (labels[:, None] == labels[None, :]) & ~eye  # (2n, 2n): each row's positive
        if not bool((same.sum(1) == 1).all()):
            raise ValueError("nt_xent: every label must occur exactly twice (two views per crop)")
        return F.cross_entropy(sim, same.float().argmax(1))

    return loss


def train_ssl(config: SSLConfig) -> TrainResult:
    """Train (or resume) a SimCLR encoder; see the module docstring.

    Raises:
        UserError: bad data, a missing device, or a run folder holding another recipe.
    """
    import numpy as np
    import torch
    from torch.nn import functional as F

    from feature_cache.devices import resolve_device
    from feature_cache.encoders.augment import Augment
    from feature_cache.encoders.backbones import build_backbone
    from feature_cache.encoders.card import read_card, save_weights, write_card
    from feature_cache.encoders.loop import RunFolder, fit, load_average, precision_for, warmup_cosine

    device = resolve_device(config.device, option="--device")
    loss_fn = nt_xent_loss(config.temperature)
    cells, train, val = _prepare(config)
    recipe = {k: v for k, v in config.to_dict().items() if k not in NOT_RECIPE}
    recipe.update(mode="ssl", method="simclr", data_fingerprint=cells.fingerprint)
    run = RunFolder(config.out, recipe, config.overwrite)
    saved = run.check()
    if saved is not None and saved["loop"]["finished"] and run.weights.exists():
        log.info("%s: already trained with this recipe; nothing to do", run.out)
        return TrainResult(run.weights, read_card(run.weights) or {})
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.backbone, config.image_size, config.width, config.pretrained)
    prec = precision_for(device, config.amp, config.channels_last)
    memory = torch.channels_last if prec.channels_last else torch.contiguous_format
    model = torch.nn.Sequential(backbone.norm, backbone.net).to(device, memory_format=memory)
    head = projection_head(backbone.dim, config.proj_dim).to(device)
    augment = Augment(config.augment)
    x_train, x_val = to_tensor(train, config.image_size), to_tensor(val, config.image_size)
    batch = min(config.batch_size, len(x_train))
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=config.lr,
                                  weight_decay=config.weight_decay)  # fmt: skip
    steps = max(1, len(x_train) // batch)
    scheduler = warmup_cosine(optimizer, steps * config.epochs, steps * config.warmup_epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=prec.scaler)
    gen = torch.Generator().manual_seed(config.seed)
    run.start()

    def views_loss(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(xb)
        views = torch.cat([augment(xb, generator), augment(xb, generator)]).contiguous(memory_format=memory)
        with prec.context(device):
            z = head(model(views))  # (2n, proj_dim)
        z = F.normalize(z.float(), dim=1)
        return loss_fn(z, torch.arange(n, device=device).repeat(2))

    def train_one(epoch: int) -> float:
        model.train()
        head.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for s in range(steps):
            xb = x_train[order[s * batch : (s + 1) * batch]].to(device)
            loss = views_loss(xb, gen)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += float(loss.detach())
        return total / steps

    def validate() -> dict[str, float]:
        model.eval()
        head.eval()
        val_gen = torch.Generator().manual_seed(config.seed + 7)  # the same views every epoch
        losses = []
        with torch.inference_mode():
            for s in range(0, len(x_val), batch):
                xb = x_val[s : s + batch].to(device)
                if len(xb) >= 2:
                    losses.append(float(views_loss(xb, val_gen)))
        return {"val_loss": float(np.mean(losses)) if losses else float("nan")}

    t0 = time.perf_counter()
    log.info("SimCLR: %s on %d unlabelled crops, %d held out; %d steps of %d per epoch on %s", config.backbone,
             len(train), len(val), steps, batch, device)  # fmt: skip

    def score(m: dict[str, float]) -> float:
        return -m["val_loss"] if np.isfinite(m["val_loss"]) else float("-inf")

    state = fit(run, saved, {"model": model, "head": head}, optimizer, scheduler, gen, config.epochs,
                config.patience, train_one, validate, score, min_epochs=config.stop_from)  # fmt: skip
    # the epoch with the lowest held-out loss is kept (no label is involved in choosing it)
    metrics = {"best_epoch": state.best_epoch, **state.history[state.best_epoch - 1]} if state.history else {}
    sha = save_weights(run.weights, backbone.weights_state(), config.backbone, backbone.options)
    card = {
        "mode": "ssl", "method": "simclr", "encoder": config.backbone, "weights": run.weights.name,
        "weights_sha256": sha, "options": backbone.options, "dim": backbone.dim, "recipe": recipe,
        "data": {"source": cells.source, "fingerprint": cells.fingerprint, "train": len(train), "val": len(val),
                 "labels_used": False},
        "metrics": metrics, "history": state.history,
        "training": {"seconds": round(state.seconds, 1), "this_process_seconds": round(time.perf_counter() - t0, 1),
                     "epochs": state.epoch, "device": str(device), "load_average": load_average(),
                     "torch_threads": torch.get_num_threads()},
        "use": f"milcore extract --encoder {config.backbone} --weights {run.weights}",
    }  # fmt: skip
    write_card(run.weights, card)
    log.info("wrote %s (%d epochs, held-out NT-Xent %.4f)", run.weights, state.epoch, metrics.get("val_loss", np.nan))
    return TrainResult(run.weights, card)
