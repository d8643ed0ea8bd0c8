"""DINOv2-style Vision Transformers (ViT-S/14, ViT-B/14, ViT-L/14) in plain torch.

Parameter names follow DINOv2's ``DinoVisionTransformer`` (``cls_token``, ``pos_embed``,
``register_tokens``, ``mask_token``, ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,
ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``), so DINOv2 and DinoBloom checkpoints load
as they are: wrappers such as ``teacher.backbone.`` are stripped, chunked blocks
(``blocks.0.3.``) renumbered and projection heads ignored. The position-embedding grid and the
number of register tokens are taken from the checkpoint; positions are resized with DINOv2's
bicubic interpolation when the input grid differs.

Features: the final-norm class token (``pool="cls"``, D) or the class token concatenated with the
mean patch token (``pool="cls+mean"``, 2D). Weights are required (a random ViT is useless).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from feature_cache.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, InputNorm, ResizeCrop, finish
from feature_cache.encoders.options import EncoderOption
from feature_cache.encoders.registry import register_encoder
from feature_cache.encoders.weights import check_sha256, load_state_dict_file, load_strict, strip_prefixes
from feature_cache.errors import InvalidArgumentError

PATCH = 14
VERSION = "1"
#: The declared options of every ViT: whole patches from 1 to 73 per side (14..1022 px).
OPTIONS = (
    EncoderOption("weights_sha256", "str", pattern="[0-9a-fA-F]{64}", help="expected SHA-256 of the weights file"),
    EncoderOption("image_size", "int", low=PATCH, high=73 * PATCH, multiple_of=PATCH, help="input side in pixels"),
    EncoderOption("pool", "str", choices=("cls", "cls+mean"), help="class token, or class token + mean patch"),
)
ARCHS = {  # name -> (embed dim, depth, heads)
    "vit_small_patch14_dinov2": (384, 12, 6),
    "vit_base_patch14_dinov2": (768, 12, 12),
    "vit_large_patch14_dinov2": (1024, 24, 16),
}


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/14 * W/14, D) with one strided convolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d/h)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, N, d/h)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    """Per-channel learned scale (``gamma``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 with a 4x hidden width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoViT(nn.Module):
    """DINOv2 ViT backbone: (B, 3, H, W) float -> (B, D) or (B, 2D) pooled features.

    Args:
        dim: embedding width.
        depth: number of blocks.
        heads: attention heads.
        pos_grid: side of the position-embedding grid stored in the checkpoint (16 for 224 px).
        registers: number of register tokens.
        pool: ``"cls"`` or ``"cls+mean"``.
    """

    def __init__(
        self, dim: int, depth: int, heads: int, pos_grid: int = 16, registers: int = 0, pool: str = "cls"
    ) -> None:
        super().__init__()
        self.pool = pool
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference; kept for key parity
        self.patch_embed = PatchEmbed(dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def positions(self, gh: int, gw: int) -> torch.Tensor:
        """(1, 1 + gh*gw, D) position embeddings for a gh x gw patch grid (DINOv2 interpolation)."""
        n = self.pos_embed.shape[1] - 1
        if n == gh * gw and gh == gw:
            return self.pos_embed
        m = int(math.sqrt(n))
        patch = self.pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, m, m)
        patch = F.interpolate(patch, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic")
        patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(self.pos_embed.dtype)
        return torch.cat([self.pos_embed[:, :1], patch], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)  # (B, N, D)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.positions(h // PATCH, w // PATCH)
        r = 0
        if self.register_tokens is not None:
            r = self.register_tokens.shape[1]
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)  # (B, 1 + R + N, D)
        cls = tokens[:, 0]
        if self.pool == "cls+mean":
            return torch.cat([cls, tokens[:, 1 + r :].mean(dim=1)], dim=1)  # (B, 2D)
        return cls  # (B, D)


def _renumber_chunks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blocks.<chunk>.<i>.x`` (DINOv2 block chunks) -> ``blocks.<i>.x``."""
    pat = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
    if not any(pat.match(k) for k in state):
        return state
    return {(f"blocks.{m.group(1)}.{m.group(2)}" if (m := pat.match(k)) else k): v for k, v in state.items()}


def build_vit(
    name: str,
    weights: str | Path,
    device: str | torch.device | None = None,
    weights_sha256: str | None = None,
    image_size: int = 224,
    pool: str = "cls",
) -> Encoder:
    """Build the ViT ``name`` from a local checkpoint (see :func:`vit_small_patch14_dinov2`)."""
    if image_size % PATCH:
        raise InvalidArgumentError(f"image_size must be a multiple of {PATCH}, got {image_size}")
    if pool not in ("cls", "cls+mean"):
        raise InvalidArgumentError(f"pool must be 'cls' or 'cls+mean', got {pool!r}")
    dim, depth, heads = ARCHS[name]
    path = Path(weights)
    sha = check_sha256(path, weights_sha256)
    expected = set(DinoViT(dim, 1, heads).state_dict())  # key names, to strip wrapper prefixes
    state = _renumber_chunks(strip_prefixes(load_state_dict_file(path), expected))
    pos = state.get("pos_embed")
    grid = round(math.sqrt(pos.shape[1] - 1)) if pos is not None and pos.ndim == 3 else image_size // PATCH
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    net = DinoViT(dim, depth, heads, pos_grid=grid, registers=regs, pool=pool)
    if "mask_token" not in state:
        state["mask_token"] = net.mask_token.detach().clone()
    load_strict(net, state, path, name, ignore=r"^(head|dino_head|ibot_head|dino_loss|ibot_patch_loss)\b")
    return finish(
        name,
        net,
        ResizeCrop(image_size, "bicubic"),
        InputNorm(IMAGENET_MEAN, IMAGENET_STD),
        version=VERSION,
        weights_sha256=sha,
        dim=dim * (2 if pool == "cls+mean" else 1),
        device=device,
        extra=f"pool={pool}",
    )


@register_encoder("vit_small_patch14_dinov2", requires_weights=True, options=OPTIONS)
def vit_small_patch14_dinov2(
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    weights_sha256: str | None = None,
    image_size: int = 224,
    pool: str = "cls",
) -> Encoder:
    """ViT-S/14 (DINOv2 / DinoBloom-S), 384-d class token.

    Args:
        weights: local ``.safetensors``/``.pth`` checkpoint (required).
        device: torch device or ``"auto"``.
        weights_sha256: expected SHA-256 of the file (checked when given).
        image_size: input side, a multiple of 14.
        pool: ``"cls"`` (D) or ``"cls+mean"`` (2D).

    Raises:
        UserError: wrong hash or weights of another architecture.
    """
    assert weights is not None  # enforced by create_encoder
    return build_vit("vit_small_patch14_dinov2", weights, device, weights_sha256, image_size, pool)


@register_encoder("vit_base_patch14_dinov2", requires_weights=True, options=OPTIONS)
def vit_base_patch14_dinov2(
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    weights_sha256: str | None = None,
    image_size: int = 224,
    pool: str = "cls",
) -> Encoder:
    """ViT-B/14 (DINOv2 / DinoBloom-B), 768-d class token; arguments as for ViT-S/14."""
    assert weights is not None
    return build_vit("vit_base_patch14_dinov2", weights, device, weights_sha256, image_size, pool)


@register_encoder("vit_large_patch14_dinov2", requires_weights=True, options=OPTIONS)
def vit_large_patch14_dinov2(
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    weights_sha256: str | None = None,
    image_size: int = 224,
    pool: str = "cls",
) -> Encoder:
    """ViT-L/14 (DINOv2 / DinoBloom-L), 1024-d class token; arguments as for ViT-S/14."""
    assert weights is not None
    return build_vit("vit_large_patch14_dinov2", weights, device, weights_sha256, image_size, pool)
