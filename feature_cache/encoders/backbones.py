"""Trainable backbones: the networks ``milcore encoder train`` fine-tunes or trains from scratch.

Each backbone is a registered encoder too, so the weights it writes load with ``milcore extract
--encoder NAME --weights FILE``:

- ``efficientnet_lite0``: fine-tuned from its installed ImageNet weights (1,280-d);
- ``compact_cnn``: trained from scratch, for small crops (8 x width features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from feature_cache.errors import InvalidArgumentError

if TYPE_CHECKING:  # the CLI reads BACKBONES without loading torch
    from torch import nn

BACKBONES = ("compact_cnn", "efficientnet_lite0")
#: Smallest input side each backbone takes (downsampling stages).
MIN_INPUT = {"compact_cnn": 16, "efficientnet_lite0": 32}


@dataclass
class Backbone:
    """A trainable network.

    Attributes:
        name: registered encoder name.
        net: (N, 3, S, S) normalised float -> (N, dim).
        norm: uint8-range -> normalised input (the encoder's ``InputNorm``).
        dim: feature dimension.
        options: what the weights header records (``image_size``, ``width``...).
    """

    name: str
    net: nn.Module
    norm: nn.Module
    dim: int
    options: dict[str, Any]

    def weights_state(self) -> dict[str, Any]:
        """The state dict the registered encoder loads."""
        inner = getattr(self.net, "net", self.net)  # efficientnet: the EfficientNet inside the pooling wrapper
        return inner.state_dict()


def build_backbone(name: str, image_size: int, width: int = 32, pretrained: bool = True) -> Backbone:
    """A backbone ready to train.

    Args:
        name: one of :data:`BACKBONES`.
        image_size: input side.
        width: first-stage channels (``compact_cnn``).
        pretrained: start from ImageNet weights (``efficientnet_lite0``; ``compact_cnn`` has none).

    Raises:
        InvalidArgumentError: unknown backbone or an input below its minimum.
        UserError: ImageNet weights package missing.
    """
    if name not in BACKBONES:
        raise InvalidArgumentError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
    if image_size < MIN_INPUT[name]:
        raise InvalidArgumentError(f"--image-size {image_size}: {name} needs at least {MIN_INPUT[name]} px")
    if name == "compact_cnn":
        from feature_cache.encoders.compact import build

        net, norm = build(width)
        return Backbone(name, net, norm, net.dim, {"image_size": int(image_size), "width": int(width)})
    from efficientnet_lite_pytorch import EfficientNet

    from feature_cache.encoders.base import InputNorm
    from feature_cache.encoders.efficientnet import LITE_MEAN, LITE_STD, _PooledLite0, packaged_weights
    from feature_cache.encoders.weights import load_state_dict_file, load_strict, strip_prefixes

    inner = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        path = packaged_weights()
        load_strict(inner, strip_prefixes(load_state_dict_file(path), set(inner.state_dict())), path,
                    "efficientnet_lite0")  # fmt: skip
    return Backbone(name, _PooledLite0(inner), InputNorm(LITE_MEAN, LITE_STD), 1280, {"image_size": int(image_size)})
