"""Dihedral test-time averaging of compact_cnn features (cells have no orientation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from feature_cache.encoders import create_encoder
from feature_cache.encoders.compact import DihedralMean, build
from feature_cache.encoders.train_supervised import SupervisedConfig, train_supervised
from tests.encoders.cellsets import drawn_cell, write_class_tree

TINY = {"image_size": 16, "width": 4, "batch_size": 8, "device": "cpu", "threads": 1, "epochs": 1, "patience": 0}


def test_dihedral_mean_is_invariant_to_rotations_and_flips() -> None:
    torch.manual_seed(0)
    net, _ = build(4)
    tta = DihedralMean(net.eval())
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        ref = tta(x)
        assert ref.shape == (3, net.dim)
        for k in range(4):
            for flip in (False, True):
                y = torch.rot90(x, k, dims=(2, 3))
                torch.testing.assert_close(tta(torch.flip(y, dims=(3,)) if flip else y), ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(net(torch.rot90(x, 1, dims=(2, 3))), net(x), atol=1e-5)  # the plain net is not


def test_trained_with_tta_extracts_with_tta_by_default(tmp_path: Path) -> None:
    tree = write_class_tree(tmp_path / "tree", n_per_class=8, size=20)
    plain = train_supervised(SupervisedConfig(data=str(tree), out=str(tmp_path / "plain"), **TINY))
    tta = train_supervised(SupervisedConfig(data=str(tree), out=str(tmp_path / "tta"), tta=True, **TINY))
    assert tta.card["options"]["tta"] is True and tta.card["recipe"]["tta"] is True
    enc = create_encoder("compact_cnn", weights=tta.weights, device="cpu")
    off = create_encoder("compact_cnn", weights=tta.weights, device="cpu", tta=False)
    assert "tta=d8" in enc.info.transform and "tta" not in off.info.transform
    assert enc.info.fingerprint() != off.info.fingerprint()  # a bank records which features it holds
    assert "tta" not in create_encoder("compact_cnn", weights=plain.weights, device="cpu").info.transform
    img = drawn_cell(0, 16, 3)
    a = enc.encode([img, np.rot90(img).copy(), img[:, ::-1].copy()])
    np.testing.assert_allclose(a[1], a[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[2], a[0], rtol=1e-4, atol=1e-5)
