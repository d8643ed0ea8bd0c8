"""``toy``: a tiny deterministic encoder for tests: 16 px thumbnail -> fixed random projection -> tanh.

The projection is drawn from a seeded generator, so the features depend only on the pixels.
32-d, float32, microseconds per crop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from feature_cache.encoders.base import Encoder, ResizeCrop, finish
from feature_cache.encoders.registry import register_encoder
from feature_cache.errors import InvalidArgumentError

SIZE = 16
DIM = 32
SEED = 0
VERSION = "1"


class Toy(nn.Module):
    """(N, 3, 16, 16) uint8 -> (N, 32) float32: centred pixels times a fixed matrix, tanh."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(SEED)
        proj = torch.randn(3 * SIZE * SIZE, DIM, generator=gen) / (3 * SIZE * SIZE) ** 0.5
        self.register_buffer("proj", proj, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.float().flatten(1) / 127.5 - 1.0  # (N, 768)
        return torch.tanh(flat @ self.proj)  # (N, 32)


@register_encoder("toy")
def toy(weights: str | Path | None = None, device: str | torch.device | None = None) -> Encoder:
    """The toy encoder (no weights; ``weights`` must be ``None``)."""
    if weights is not None:
        raise InvalidArgumentError("encoder 'toy' takes no weights")
    return finish(
        "toy", Toy(), ResizeCrop(SIZE, "box"), None, version=VERSION, weights_sha256="", dim=DIM, device=device,
        extra=f"seed={SEED}", amp=False,
    )  # fmt: skip
