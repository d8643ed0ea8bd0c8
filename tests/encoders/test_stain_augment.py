"""HED maths agree with scikit-image; stain normalisation moves bags to the target; augmentations keep
cells cells; extraction records stain normalisation in the fingerprint and refuses to mix it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed

from feature_cache.encoders.augment import Augment, AugmentConfig
from feature_cache.encoders.stain import (
    DEFAULT_TARGET,
    StainNormalizer,
    hed_to_rgb,
    lab_stats,
    macenko_stains,
    rgb_to_hed,
)
from tests.encoders.cellsets import drawn_cell, write_patients


def _batch(n: int = 6, size: int = 24) -> np.ndarray:
    return np.stack([drawn_cell(i % 3, size, i) for i in range(n)])  # (n, S, S, 3) uint8


def test_hed_matches_scikit_image() -> None:
    x = _batch()
    t = torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255.0
    hed = rgb_to_hed(t).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(hed, rgb2hed(x), atol=1e-10)
    back = hed_to_rgb(torch.from_numpy(hed).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(back, hed2rgb(hed), atol=1e-10)
    unclamped = rgb_to_hed(t, clamp=False)  # the jitter's round trip is exact
    torch.testing.assert_close(hed_to_rgb(unclamped), t.clamp_min(1e-6), atol=1e-9, rtol=1e-9)


def _restain(x: np.ndarray, gain: tuple[float, float, float]) -> np.ndarray:
    od = -np.log(np.clip(x / 255.0, 1 / 255, 1)) * np.asarray(gain)
    return np.clip(np.exp(-od) * 255, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_normalisation_undoes_a_stain_shift(method: str) -> None:
    x = _batch(30)
    shifted = _restain(x, (1.4, 0.8, 1.1))
    norm = StainNormalizer(method)
    a = np.stack(norm(list(x))).astype(float)
    b = np.stack(norm(list(shifted))).astype(float)
    assert np.abs(a - b).mean() < 0.5 * np.abs(x.astype(float) - shifted).mean()
    if method == "reinhard":
        mean, _ = lab_stats(b.reshape(-1, 3) / 255.0)
        np.testing.assert_allclose(mean, DEFAULT_TARGET.lab_mean, atol=3.0)


def test_macenko_recovers_two_stain_vectors() -> None:
    rng = np.random.default_rng(0)
    v = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    conc = rng.uniform(0, 1.5, (5000, 2))
    rgb = np.exp(-(conc @ v))
    stains, _ = macenko_stains(rgb)
    cos = np.abs(stains @ v.T).max(axis=1)
    assert (cos > 0.99).all()


def test_normaliser_leaves_blank_bags_alone_and_describes_itself() -> None:
    blank = [np.full((8, 8, 3), 250, np.uint8)] * 3
    assert all((o == b).all() for o, b in zip(StainNormalizer("macenko")(blank), blank, strict=True))
    assert StainNormalizer("reinhard").describe().startswith("stain_norm=reinhard,per=bag,lab_mean=71.775")


def test_augment_none_is_identity_and_geometry_keeps_pixels() -> None:
    x = torch.from_numpy(_batch()).permute(0, 3, 1, 2)
    assert torch.equal(Augment(AugmentConfig.none())(x), x.float())
    dihedral = AugmentConfig.none().replace(dihedral=True)
    y = Augment(dihedral)(x, torch.Generator().manual_seed(1))
    for a, b in zip(x.float(), y, strict=True):  # a rotation/flip permutes pixels
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)


def test_augment_is_seeded_bounded_and_jitters_stain() -> None:
    x = torch.from_numpy(_batch()).permute(0, 3, 1, 2)
    aug = Augment(AugmentConfig.ssl())
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 255
    stain_only = Augment(AugmentConfig.none().replace(hed_sigma=0.2))
    c = stain_only(x, torch.Generator().manual_seed(0))
    assert (c - x.float()).abs().mean() > 1.0  # colours moved
    assert stain_only.config.hed_sigma == 0.2


def test_extraction_records_stain_normalisation_and_refuses_to_mix(tmp_path: Path, capsys) -> None:
    from feature_cache.bank import open_reader
    from milcore.cli import main

    root = write_patients(tmp_path / "cohort", n=4, cells=4)
    bank = tmp_path / "b.h5"
    common = ["extract", "--source", "crops", "--input", str(root / "crops"), "--encoder", "toy", "--device", "cpu",
              "--workers", "0", "-q"]  # fmt: skip
    assert main([*common, "--out", str(bank), "--stain-norm", "reinhard"]) == 0
    with open_reader(bank) as r:
        assert "stain_norm=reinhard,per=bag" in r.info.transform
    assert main([*common, "--out", str(tmp_path / "plain.h5")]) == 0
    with open_reader(tmp_path / "plain.h5") as r, open_reader(bank) as s:
        assert r.info.fingerprint() != s.info.fingerprint()
        assert not np.allclose(r.read(r.bag_ids()[0]), s.read(s.bag_ids()[0]))
    (root / "crops" / "p99").mkdir()  # a new bag, so the rerun has something to append
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(drawn_cell(0, 20, 9)).save(root / "crops" / "p99" / "c0.png")
    capsys.readouterr()
    assert main([*common, "--out", str(bank)]) == 2  # resuming the normalised bank without normalisation
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transform" in err[0]
    assert main([*common, "--out", str(tmp_path / "x.h5"), "--stain-reference", str(root)]) == 2
    assert "--stain-norm" in capsys.readouterr().err
