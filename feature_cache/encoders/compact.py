"""``compact_cnn``: a small VGG-style CNN for small cell crops (28-96 px), trained from scratch.

Four stages of 3x3 convolutions with batch norm (widths w, 2w, 4w, 8w; the first stage one
convolution, the others two), 2x2 max-pooling between stages, global average pooling: (N, 3, S, S) ->
(N, 8w). At 28 px and w=32 it has 1.1 M parameters and about 40 M multiply-adds per crop, small
enough to train on BloodMNIST's 12k training cells on a CPU (``benchmarks/bench_encoders.py``).

It has no pretrained weights: ``milcore encoder train --backbone compact_cnn`` makes them, and the
weights file's header carries the width and input size it was trained with, so ``milcore extract
--encoder compact_cnn --weights encoder.safetensors`` needs no other option.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from feature_cache.encoders.base import Encoder, InputNorm, ResizeCrop, finish
from feature_cache.encoders.card import trained_options
from feature_cache.encoders.options import EncoderOption
from feature_cache.encoders.registry import register_encoder
from feature_cache.encoders.weights import check_sha256, load_state_dict_file, load_strict

NAME = "compact_cnn"
VERSION = "1"
#: Input scaling: crops are mostly bright background; batch norm takes care of the rest.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
MIN_SIZE = 16  # three 2x poolings leave 2 x 2
OPTIONS = (
    EncoderOption("weights_sha256", "str", pattern="[0-9a-fA-F]{64}", help="expected SHA-256 of the weights file"),
    EncoderOption("image_size", "int", low=MIN_SIZE, high=512, help="input side in pixels (default: as trained)"),
    EncoderOption("width", "int", low=4, high=256, help="channels of the first stage (default: as trained)"),
    EncoderOption("tta", "bool", help="average the features over the 8 rotations/flips of each crop (default: as "
                  "trained)"),
)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CompactCNN(nn.Module):
    """(N, 3, S, S) normalised float -> (N, 8 * width) features.

    Args:
        width: channels of the first stage.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = int(width)
        layers: list[nn.Module] = [*_block(3, w)]
        cin = w
        for cout in (2 * w, 4 * w, 8 * w):
            layers += [nn.MaxPool2d(2), *_block(cin, cout), *_block(cout, cout)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))  # (N, 8w)


class DihedralMean(nn.Module):
    """Test-time averaging over the dihedral group: the mean of ``net`` over the 4 rotations by 90 degrees
    of each crop and of its mirror image (cells have no orientation), (N, 3, S, S) -> (N, dim); 8x the
    cost, exactly invariant to those rotations and flips.

    Args:
        net: the network to average (its ``dim`` is kept).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.dim = net.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for view in (x, torch.flip(x, dims=(3,))):
            for k in range(4):
                y = self.net(torch.rot90(view, k, dims=(2, 3)))  # (N, dim)
                total = y if total is None else total + y
        return total / 8


def build(width: int = 32) -> tuple[CompactCNN, InputNorm]:
    """A fresh (randomly initialised) network and its input normalisation."""
    return CompactCNN(width), InputNorm(MEAN, STD)


@register_encoder("compact_cnn", requires_weights=True, options=OPTIONS)  # a literal: found without import
def compact_cnn(
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    weights_sha256: str | None = None,
    image_size: int | None = None,
    width: int | None = None,
    tta: bool | None = None,
) -> Encoder:
    """The compact CNN with trained weights.

    Args:
        weights: ``encoder.safetensors`` written by ``milcore encoder train --backbone compact_cnn``.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...
        weights_sha256: expected SHA-256 of ``weights`` (checked when given).
        image_size: input side; default: the size recorded in the weights file (else 28).
        width: first-stage channels; default: as recorded (else 32).
        tta: dihedral test-time averaging (:class:`DihedralMean`); default: as recorded (else off).

    Raises:
        UserError: missing file, wrong hash, weights trained as another architecture or of another width.
    """
    path = Path(weights)  # requires_weights: create_encoder refuses None before calling
    opts = trained_options(path, NAME, {"image_size": image_size, "width": width, "tta": tta})
    sha = check_sha256(path, weights_sha256)
    net, norm = build(int(opts.get("width", 32)))
    load_strict(net, load_state_dict_file(path), path, f"{NAME} (width {net.dim // 8})")
    size = int(opts.get("image_size", 28))
    averaged = bool(opts.get("tta", False))
    extra = f"width={net.dim // 8};pool=mean" + (";tta=d8" if averaged else "")  # no tta: the fingerprint as before
    return finish(NAME, DihedralMean(net) if averaged else net, ResizeCrop(size, "bilinear"), norm, version=VERSION,
                  weights_sha256=sha, dim=net.dim, device=device, extra=extra)  # fmt: skip
