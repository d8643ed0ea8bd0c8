"""The settings every encoder training run shares (supervised and self-supervised).

:class:`EncoderTrainConfig` declares and documents them once; :class:`~.train_supervised.SupervisedConfig`
and :class:`~.train_ssl.SSLConfig` add their own fields and redeclare only the defaults that differ
(the SSL batch, patience and augmentations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from feature_cache.config import Config, option
from feature_cache.encoders.augment import AugmentConfig
from feature_cache.encoders.backbones import BACKBONES

#: Settings that do not change the result (may differ when resuming).
NOT_RECIPE = ("data", "out", "device", "overwrite", "threads")


@dataclass(frozen=True)
class EncoderTrainConfig(Config):
    """One encoder training run (the settings both modes share).

    Attributes:
        data: class-per-folder crop tree, CSV (path[, label][, split]) or MedMNIST ``.npz`` (its ``train``
            split is trained on, ``val`` held out, ``test`` never used for training or selection).
        out: output folder (weights, card, resumable state).
        backbone: ``compact_cnn`` (from scratch) or ``efficientnet_lite0`` (fine-tuned).
        image_size: network input side in pixels.
        width: first-stage channels of ``compact_cnn``.
        pretrained: start ``efficientnet_lite0`` from its ImageNet weights.
        epochs: maximum epochs.
        batch_size: crops per step.
        lr: AdamW peak learning rate (linear warm-up, then cosine decay to zero, stepped per batch).
        weight_decay: AdamW weight decay.
        warmup_epochs: epochs of linear learning-rate warm-up.
        val_fraction: held-out fraction (stratified when labelled) when the data has no ``val`` split.
        patience: epochs without a better validation score before stopping (0: never stop early); the
            best epoch's weights are kept either way.
        min_epochs: never stop early before this epoch (0: half of ``epochs``: the high learning rate of
            the schedule's first half makes validation noisy).
        max_upscale: largest enlargement of a crop to the input size (smaller crops are refused).
        max_cells: use at most this many training crops (0: all); for quick runs.
        augment: augmentation settings.
        seed: random seed (initialisation, batches, augmentations).
        device: ``auto``, ``cpu``, ``cuda``...
        amp: mixed precision: bfloat16 (float16 where unsupported) on CUDA, bfloat16 on CPUs that compute
            it natively (AVX512-BF16, AMX); validation and the written weights stay float32.
        channels_last: channels-last memory format (default: where mixed precision is used).
        threads: CPU threads for torch (0: torch's default).
        overwrite: start afresh instead of resuming.
    """

    config_key = "encoder training option"

    data: str
    out: str
    backbone: str = option("compact_cnn", choices=BACKBONES)
    image_size: int = option(28, low=16, high=512)
    width: int = option(32, low=4, high=256)
    pretrained: bool = True
    epochs: int = option(30, low=1)
    batch_size: int = option(128, low=2)
    lr: float = option(2e-3, low=0, low_open=True)
    weight_decay: float = option(1e-4, low=0)
    warmup_epochs: int = option(1, low=0)
    val_fraction: float = option(0.1, low=0, high=0.5, low_open=True)
    patience: int = option(6, low=0)
    min_epochs: int = option(0, low=0)
    max_upscale: float = option(4.0, low=1)
    max_cells: int = option(0, low=0)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = option(0, low=0)
    device: str = "auto"
    amp: bool = True
    channels_last: bool | None = None
    threads: int = option(0, low=0)
    overwrite: bool = False

    @property
    def stop_from(self) -> int:
        """The first epoch at which early stopping may end the run."""
        return self.min_epochs or (self.epochs + 1) // 2
