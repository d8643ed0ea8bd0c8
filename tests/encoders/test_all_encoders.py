"""Every registered encoder: output shape, dtype, determinism, batch independence, fingerprint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from feature_cache.bank import EncoderInfo
from feature_cache.encoders import create_encoder, encoder_spec, list_encoders
from feature_cache.encoders.base import Encoder
from tests.encoders.cellsets import compact_weights

SLOW = {"vit_base_patch14_dinov2", "vit_large_patch14_dinov2"}


def _params() -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_encoders()]


def _compact_checkpoint(root: Path) -> Path:
    """A random ``compact_cnn`` weights file, written once per session root."""
    path = root / "compact_cnn.safetensors"
    return path if path.exists() else compact_weights(path)


def _build(name: str, vit_checkpoint: Callable[..., Path]):
    if name == "compact_cnn":  # trained by milcore encoder train: its own weights format, not a ViT
        path = _compact_checkpoint(vit_checkpoint("vit_small_patch14_dinov2").parent)
        return create_encoder(name, weights=path, device="cpu")
    if encoder_spec(name).requires_weights:
        path = vit_checkpoint(name, half=name in SLOW)
        return create_encoder(name, weights=path, device="cpu", image_size=70)
    return create_encoder(name, device="cpu")


@pytest.mark.parametrize("name", _params())
def test_encoder_contract(name: str, crops: list[np.ndarray], vit_checkpoint: Callable[..., Path]) -> None:
    check_encoder(name, lambda: _build(name, vit_checkpoint), crops)


def check_encoder(name: str, build: Callable[[], Encoder], crops: list[np.ndarray]) -> None:
    """The encoder contract: tuple form, fingerprint, frozen, transform, shape, dtype, determinism,
    batch independence, and the same fingerprint and features from a second build."""
    enc = build()
    assert enc.name == name and enc.device.type == "cpu"
    assert isinstance(enc.info, EncoderInfo) and enc.info.name == name and enc.info.dim == enc.dim
    assert len(enc.info.to_dict()["fingerprint"]) == 64 and enc.info.transform
    assert not any(p.requires_grad for p in enc.module.parameters())
    module, transform, dtype, info = enc
    assert (module, transform, dtype, info) == (enc.module, enc.transform, enc.dtype, enc.info)
    x = enc.transform(crops[3])  # a non-square crop
    assert tuple(x.shape) == (3, enc.input_size, enc.input_size) and str(x.dtype) == "torch.uint8"

    feats = enc.encode(crops, batch_size=3)
    assert feats.shape == (len(crops), enc.dim) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert np.ptp(feats, axis=0).max() > 0  # different cells, different features
    np.testing.assert_array_equal(enc.encode(crops, batch_size=3), feats)  # deterministic
    np.testing.assert_allclose(enc.encode(crops[:1], batch_size=1), feats[:1], rtol=1e-4, atol=1e-4)

    again = build()
    assert again.info == enc.info
    np.testing.assert_array_equal(again.encode(crops, batch_size=3), feats)


def test_list_encoders_covers_the_issue() -> None:
    assert {"efficientnet_lite0", "morphology", "toy", "vit_small_patch14_dinov2", "vit_base_patch14_dinov2"} <= set(
        list_encoders()
    )
    assert list_encoders("vit_*") == [n for n in list_encoders() if n.startswith("vit_")]
    assert list_encoders("nothing*") == []
