"""The DINOv2-style ViT: checkpoint layouts that must load, a reference forward, clear errors."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from feature_cache.encoders import create_encoder
from feature_cache.encoders.vit import DinoViT
from feature_cache.errors import InvalidArgumentError, UserError

SMALL = "vit_small_patch14_dinov2"


def _encode(path: Path, crops: list[np.ndarray], **options: object) -> np.ndarray:
    enc = create_encoder(SMALL, weights=path, device="cpu", image_size=56, **options)
    return enc.encode(crops[:2])


def test_dinov2_and_dinobloom_checkpoint_layouts_load_identically(
    vit_checkpoint: Callable[..., Path], crops: list[np.ndarray], tmp_path: Path
) -> None:
    path = vit_checkpoint(SMALL)
    state = load_file(str(path))
    reference = _encode(path, crops)
    # DINOv2 training checkpoint: {"teacher": {"backbone.*", "dino_head.*"}} saved with torch.save
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["dino_head.last_layer.weight"] = torch.zeros(8, 4)
    torch.save({"teacher": teacher, "iteration": 1000}, tmp_path / "teacher_checkpoint.pth")
    # DistributedDataParallel prefix, no mask token, and DINOv2's chunked blocks (blocks.<chunk>.<i>.)
    ddp = {f"module.{k}": v for k, v in state.items() if k != "mask_token"}
    torch.save(ddp, tmp_path / "ddp.pt")
    chunked = {(k.replace("blocks.", f"blocks.{int(k.split('.')[1]) // 4}.", 1) if k.startswith("blocks.") else k): v
               for k, v in state.items()}  # fmt: skip
    torch.save({"model": chunked}, tmp_path / "chunked.pth")
    for name in ("teacher_checkpoint.pth", "ddp.pt", "chunked.pth"):
        np.testing.assert_allclose(_encode(tmp_path / name, crops), reference, rtol=1e-5, atol=1e-5)


def test_registers_position_interpolation_and_pooling(
    vit_checkpoint: Callable[..., Path], crops: list[np.ndarray]
) -> None:
    dinov2 = vit_checkpoint(SMALL, grid=37, registers=4)  # DINOv2 hub layout: 518 px positions, registers
    feats = _encode(dinov2, crops)
    assert feats.shape == (2, 384) and np.isfinite(feats).all()
    both = _encode(dinov2, crops, pool="cls+mean")
    assert both.shape == (2, 768)
    np.testing.assert_allclose(both[:, :384], feats, rtol=1e-5, atol=1e-5)
    enc = create_encoder(SMALL, weights=dinov2, image_size=56)
    assert "pool=cls" in enc.info.transform and enc.info.dim == 384


def test_forward_matches_a_plain_reference() -> None:
    """A 2-block ViT against attention written out by hand (token order, scaling, layer scale, norms)."""
    torch.manual_seed(0)
    net = DinoViT(dim=12, depth=2, heads=3, pos_grid=3, registers=2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 3, 28, 28)  # 2 x 2 patches: positions interpolated from 3 x 3
    with torch.no_grad():
        got = net(x)
        tok = F.conv2d(x, net.patch_embed.proj.weight, net.patch_embed.proj.bias, stride=14).flatten(2).transpose(1, 2)
        grid = net.pos_embed[:, 1:].reshape(1, 3, 3, 12).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, scale_factor=(2.1 / 3, 2.1 / 3), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 4, 12)
        tok = torch.cat([net.cls_token.expand(2, -1, -1) + net.pos_embed[:, :1], tok + pos], dim=1)
        tok = torch.cat([tok[:, :1], net.register_tokens.expand(2, -1, -1), tok[:, 1:]], dim=1)  # (2, 7, 12)
        for blk in net.blocks:
            h = F.layer_norm(tok, (12,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
            q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(12, dim=-1)
            heads = [
                torch.softmax(q[..., i : i + 4] @ k[..., i : i + 4].transpose(1, 2) / 2.0, dim=-1) @ v[..., i : i + 4]
                for i in range(0, 12, 4)
            ]
            tok = tok + blk.ls1.gamma * (torch.cat(heads, dim=-1) @ blk.attn.proj.weight.T + blk.attn.proj.bias)
            h = F.layer_norm(tok, (12,), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
            tok = tok + blk.ls2.gamma * blk.mlp.fc2(F.gelu(blk.mlp.fc1(h)))
        want = F.layer_norm(tok, (12,), net.norm.weight, net.norm.bias, eps=1e-6)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_wrong_weights_are_clear_errors(vit_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    small = vit_checkpoint(SMALL)
    with pytest.raises(UserError, match=r"do not fit architecture vit_base_patch14_dinov2: .*shape mismatch"):
        create_encoder("vit_base_patch14_dinov2", weights=small)
    state = load_file(str(small))
    del state["blocks.11.mlp.fc2.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"1 missing key\(s\), e\.g\. blocks\.11\.mlp\.fc2\.weight"):
        create_encoder(SMALL, weights=tmp_path / "missing.pth")
    (tmp_path / "truncated.safetensors").write_bytes(small.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot load weights safely"):
        create_encoder(SMALL, weights=tmp_path / "truncated.safetensors")
    torch.save({"model": {"args": argparse.Namespace(lr=0.1)}}, tmp_path / "pickle.pth")  # not weights-only
    with pytest.raises(UserError, match="cannot load weights safely"):
        create_encoder(SMALL, weights=tmp_path / "pickle.pth")
    with pytest.raises(UserError, match="weights SHA-256 is"):
        create_encoder(SMALL, weights=small, weights_sha256="ab" * 32)
    with pytest.raises(UserError, match="weights file not found"):
        create_encoder(SMALL, weights=tmp_path / "nope.pth")
    with pytest.raises(UserError, match="needs a local weights file"):
        create_encoder(SMALL)
    with pytest.raises(InvalidArgumentError, match="multiple of 14"):
        create_encoder(SMALL, weights=small, image_size=100)
    with pytest.raises(InvalidArgumentError, match=r"pool=max: must be one of cls, cls\+mean"):
        create_encoder(SMALL, weights=small, pool="max")
