"""Pixel-level explanations (issue 16 item 3): Grad-CAM and integrated gradients through encoder and
aggregator, the pointing game, overlays in the explanation gallery, and the notes when crops are absent."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from milcore.cli import main
from milcore.trust import pixels as px
from tests.encoders.cellsets import compact_weights


class _Mean(nn.Module):
    """A bag model: per-bag mean of the features times a fixed matrix (C = 2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor, ptr: torch.Tensor, coords: torch.Tensor | None = None) -> SimpleNamespace:
        sizes = (ptr[1:] - ptr[:-1]).tolist()
        pooled = torch.stack([chunk.mean(0) for chunk in torch.split(x, sizes)])  # (B, D)
        return SimpleNamespace(logits=self.w(pooled))


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip


def test_integrated_gradients_are_complete_and_gradcam_is_a_map() -> None:
    enc = _encoder()
    score = px.BagScore([_Mean(8)], torch.randn(5, 8))
    crop = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    ig = px.integrated_gradients(enc, crop, score, row=2, target=1, steps=64)
    assert ig.attribution.shape == (3, 16, 16) and ig.completeness_error < 0.02
    name, layer = px.gradcam_layer(enc, 16, min_side=6)
    assert name == "3"  # the deepest map with at least 6 x 6 positions (the second conv's activation)
    cam = px.gradcam(enc, layer, crop, score, row=2, target=1)
    assert cam.shape == (16, 16) and (cam >= 0).all()
    assert px.gradcam_layer(nn.Sequential(nn.Flatten(), nn.Linear(768, 4)), 16, 6) is None


def test_smoothgrad_averages_integrated_gradients_over_noisy_crops() -> None:
    enc = _encoder()
    score = px.BagScore([_Mean(8)], torch.randn(5, 8))
    crop = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    sg = px.smoothgrad_ig(enc, crop, score, row=2, target=1, steps=64, samples=4, sigma=0.1, seed=3)
    assert sg.attribution.shape == (3, 16, 16) and sg.completeness_error < 0.02  # each run complete, so their mean
    again = px.smoothgrad_ig(enc, crop, score, row=2, target=1, steps=64, samples=4, sigma=0.1, seed=3)
    assert np.array_equal(sg.attribution, again.attribution)  # seeded
    plain = px.integrated_gradients(enc, crop, score, row=2, target=1, steps=64)
    assert not np.allclose(sg.attribution, plain.attribution)
    quiet = px.smoothgrad_ig(enc, crop, score, row=2, target=1, steps=64, samples=3, sigma=0.0)
    assert np.allclose(quiet.attribution, plain.attribution, atol=1e-5)  # no noise: plain IG


def test_bag_score_replaces_one_row() -> None:
    model = _Mean(4)
    x = torch.randn(6, 4)
    score = px.BagScore([model], x)
    feats = torch.stack([x[3], torch.zeros(4)])  # unchanged, then row 3 zeroed
    out = score(feats, 3)
    full = model(x, torch.tensor([0, 6])).logits[0]
    x0 = x.clone()
    x0[3] = 0
    assert torch.allclose(out[0], full, atol=1e-6) and torch.allclose(out[1], model(x0, torch.tensor([0, 6])).logits[0])


def test_pointing_game_hits_misses_and_chance() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:5, 2:5] = True
    sal = np.zeros((20, 20), dtype=np.float32)
    sal[3, 3] = 1.0
    assert px.pointing_game(sal, mask).hit
    sal2 = np.zeros_like(sal)
    sal2[6, 6] = 1.0  # 1.4 px away from the mask: a hit within 3 px, a miss within 1 px
    assert px.pointing_game(sal2, mask, tolerance=3).hit and not px.pointing_game(sal2, mask, tolerance=1).hit
    far = np.zeros_like(sal)
    far[18, 18] = 1.0
    pt = px.pointing_game(far, mask)
    assert not pt.hit and pt.distance > 10 and not pt.chance_centre and 0 < pt.chance_cell < 0.2
    assert not px.pointing_game(np.zeros_like(sal), mask).hit  # an empty map never hits
    with pytest.raises(ValueError, match="empty mask"):
        px.pointing_game(sal, np.zeros_like(mask))


def test_maps_go_back_onto_the_crop_grid() -> None:
    sal = np.zeros((16, 16), dtype=np.float32)
    sal[8, 8] = 1.0
    back = px.to_crop_grid(sal, (32, 48))  # resize shorter side 32 -> 16, centre-crop 24 -> 16 wide
    y, x = px.peak(back)
    assert back.shape == (32, 48) and abs(y - 16) <= 2 and abs(x - 24) <= 2
    assert px.overlay(np.zeros((32, 48, 3), np.uint8), back, back > 0.5).shape == (32, 48, 3)


def test_explain_pixels_without_crops_is_a_note(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["explain", "--run", str(run_copy), "--out", str(tmp_path / "ex"), "--pixels", "--patients", "2"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert summary["pixels"]["cells"] == {} and "no crops" in summary["pixels"]["notes"][0]
    assert "no crops" in (tmp_path / "ex" / "explain.html").read_text()


def test_a_trained_encoder_is_rebuilt_from_its_weights_file_and_no_other(tmp_path: Path) -> None:
    """An encoder from ``milcore encoder train`` is not packaged: its maps need the file the bank was extracted
    with, checked by the fingerprint; another file would explain features the model never saw."""
    from feature_cache.encoders import create_encoder
    from feature_cache.errors import UserError
    from milcore.trust.pixel_run import rebuild_encoder

    good = compact_weights(tmp_path / "trained.safetensors", 0)
    other = compact_weights(tmp_path / "other.safetensors", 1)
    info = create_encoder("compact_cnn", weights=good, device="cpu").info
    enc, why = rebuild_encoder(info)
    assert enc is None and "--encoder-weights FILE" in why
    enc, why = rebuild_encoder(info, weights=good)
    assert why is None and enc.info.weights_sha256 == info.weights_sha256
    with pytest.raises(UserError, match=r"other\.safetensors: not the weights .*weights_sha256"):
        rebuild_encoder(info, weights=other)
    with pytest.raises(UserError, match=r"missing\.safetensors"):
        rebuild_encoder(info, weights=tmp_path / "missing.safetensors")


def test_encoder_weights_without_pixels_is_refused(run_copy: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    rc = main(["explain", "--run", str(run_copy), "--out", str(tmp_path / "ex"), "--encoder-weights", "w.safetensors"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--encoder-weights is only used by --pixels" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ex").exists()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic ALL cohort (crops and masks), a toy-encoder bank and a 3-fold ABMIL run on it."""
    root = tmp_path_factory.mktemp("pixels")
    assert main(["synth", "--task", "all", "--patients", "12", "--seed", "0", "--bag-median", "10", "--bag-min", "8",
                 "--bag-max", "12", "--crop-size", "48", "--witness-median", "0.3", "-q", str(root / "cohort")]) == 0
    assert main(["extract", "--source", "synthetic", "--input", str(root / "cohort"), "--encoder", "toy", "--out",
                 str(root / "bank.h5"), "--workers", "0", "-q"]) == 0  # fmt: skip
    assert main(["train", "--bank", str(root / "bank.h5"), "--cohort", str(root / "cohort" / "cohort.csv"), "--task",
                 "all", "--folds", "3", "--model", "abmil", "--epochs", "2", "--out", str(root / "run"), "-q"]) == 0
    return root


@pytest.mark.slow  # synthesis, extraction with a trained-format encoder, a training run: about 20 s
def test_explain_pixels_of_a_bank_from_a_trained_encoder_with_its_weights_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = compact_weights(tmp_path / "enc.safetensors", 0)
    cohort, bank, run = tmp_path / "cohort", tmp_path / "bank.h5", tmp_path / "run"
    tiny = ["--patients", "9", "--seed", "0", "--bag-median", "10", "--bag-min", "8", "--bag-max", "12",
            "--crop-size", "48", "--witness-median", "0.3"]  # fmt: skip
    assert main(["synth", "--task", "auer", *tiny, "-q", str(cohort)]) == 0
    assert main(["extract", "--source", "synthetic", "--input", str(cohort), "--encoder", "compact_cnn", "--weights",
                 str(weights), "--out", str(bank), "--workers", "0", "-q"]) == 0  # fmt: skip
    assert main(["train", "--bank", str(bank), "--cohort", str(cohort / "cohort.csv"), "--task", "auer", "--folds",
                 "3", "--model", "abmil", "--epochs", "2", "--out", str(run), "-q"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["explain", "--run", str(run), "--out", str(tmp_path / "none"), "--pixels", "-q"]) == 0
    pix = json.loads((tmp_path / "none" / "explain.json").read_text())["pixels"]
    assert pix["cells"] == {} and any("--encoder-weights FILE" in n for n in pix["notes"])
    assert main(["explain", "--run", str(run), "--out", str(tmp_path / "ex"), "--pixels", "--encoder-weights",
                 str(weights), "--patients", "9", "-q"]) == 0  # fmt: skip
    pix = json.loads((tmp_path / "ex" / "explain.json").read_text())["pixels"]
    cells = [c for cs in pix["cells"].values() for c in cs]
    assert cells and all("integrated_gradients" in c["methods"] for c in cells) and pix["notes"] == []
    other = compact_weights(tmp_path / "other.safetensors", 1)
    capsys.readouterr()
    assert main(["explain", "--run", str(run), "--out", str(tmp_path / "bad"), "--pixels", "--encoder-weights",
                 str(other)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "other.safetensors: not the weights" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # synthesis, extraction and a training run: about 30 s on an idle 2-core machine
def test_overlays_and_pointing_game_on_a_synthetic_cohort(toy_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "ex"
    rc = main(["explain", "--run", str(toy_run / "run"), "--out", str(out), "--pixels", "gradcam,integrated_gradients",
               "--pixel-score", "bag", "--pixel-cells", "6", "--patients", "12"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    pix = json.loads((out / "explain.json").read_text())["pixels"]
    assert any("no convolutional feature map: Grad-CAM skipped" in n for n in pix["notes"])  # toy: no conv map
    cells = [c for cs in pix["cells"].values() for c in cs]
    assert len(cells) >= 30 and all("integrated_gradients" in c["methods"] for c in cells)
    # completeness (relative to the logit change, large only where a cell barely moves the logit)
    assert np.median([c["ig_completeness_error"] for c in cells]) < 0.05
    scored = [c for c in cells if c["feature"]]  # every diagnostic cell has its feature's mask
    game = pix["pointing_game"]["integrated_gradients"]
    assert scored and game["cells"] == len(scored) and 0 <= game["accuracy"] <= 1
    assert {c["feature"] for c in scored} <= {"nucleus", "auer_rod", "granules", "red_cell"}
    html = (out / "explain.html").read_text()
    assert "Pixel explanations of the top cells" in html and "pointing-game accuracy" in html


@pytest.mark.slow  # uses the toy_run fixture (synthesis, extraction, training)
def test_pixel_target_explains_the_predicted_or_the_true_class(toy_run: Path) -> None:
    """``target=true`` explains the patient's label (the pointing game of Zhang et al. scores the explanation of
    the ground-truth class); an unlabelled patient cannot be explained that way and is named in a note."""
    import dataclasses

    from feature_cache.bank import open_reader
    from feature_cache.errors import UserError
    from milcore.data.predictions import read_attention, read_predictions
    from milcore.trust.pixel_run import explain_pixels
    from milcore.trust.pixels import PixelConfig

    run = toy_run / "run"
    table, attention = read_predictions(run), read_attention(run)
    where = {b: i for i, b in enumerate(table.bag_ids)}
    with open_reader(toy_run / "bank.h5") as reader:
        for target, want in (("predicted", table.predicted), ("true", table.labels)):
            config = PixelConfig(target=target, methods=("integrated_gradients",), cells_per_patient=1, ig_steps=2)
            res = explain_pixels(run, reader, table, attention, table.bag_ids, toy_run / "cohort", config)
            assert len(res.cells) == len(table.bag_ids)
            assert [c.target for c in res.cells] == [int(want[where[c.bag_id]]) for c in res.cells]
            assert res.to_json()["target"] == target
        unlabelled = dataclasses.replace(table, labels=np.full(len(table.bag_ids), -1))
        config = PixelConfig(target="true", methods=("integrated_gradients",), cells_per_patient=1, ig_steps=2)
        res = explain_pixels(run, reader, unlabelled, attention, table.bag_ids[:2], toy_run / "cohort", config)
        assert not res.cells and sum("no label" in n for n in res.notes) == 2
    with pytest.raises(UserError, match="target"):
        PixelConfig.from_dict({"target": "guess"})


# ------------------------------------------------------------------------------------------- round 4: occlusion,
# the cell's own attention / contribution explained, the erasure check, the relevance mass


class _Attn(nn.Module):
    """A bag model with attention: softmax over a linear score of each row; logits = head(attention-pooled rows)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(dim, 1)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor, ptr: torch.Tensor, coords: torch.Tensor | None = None) -> SimpleNamespace:
        sizes = (ptr[1:] - ptr[:-1]).tolist()
        att = torch.cat([torch.softmax(self.a(chunk)[:, 0], 0) for chunk in torch.split(x, sizes)])  # (N,)
        parts = zip(torch.split(att, sizes), torch.split(x, sizes), strict=True)
        pooled = torch.stack([(w[:, None] * c).sum(0) for w, c in parts])  # (B, D)
        return SimpleNamespace(logits=self.head(pooled), attention=att)


class _Window(nn.Module):
    """An 'encoder' that reads only the pixels [4:8, 10:14] of the crop: their mean darkness, per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 255.0 - x[:, :, 4:8, 10:14].mean(dim=(2, 3))  # (m, 3)


def test_occlusion_window_is_given_in_crop_pixels() -> None:
    """The same 12 px patch of a 96 px crop at every encoder input size (efficientnet_lite0 reads 224 px: there
    a 12 px patch of the input grid was 5 px of the crop, and 2,916 windows a cell instead of 484)."""
    assert px.occlusion_window(12, 4, crop_side=96, input_side=96) == (12, 4)
    assert px.occlusion_window(12, 4, crop_side=96, input_side=224) == (28, 9)
    assert px.occlusion_window(12, 4, crop_side=96, input_side=28) == (4, 1)
    assert px.occlusion_window(1, 1, crop_side=96, input_side=16) == (1, 1)


def test_occlusion_maps_exactly_the_pixels_the_score_reads() -> None:
    x = torch.zeros(4, 3)
    head = _Mean(3)
    with torch.no_grad():
        head.w.weight.fill_(1.0)  # target logit grows with the window's darkness
    score = px.BagScore([head], x)
    crop = torch.full((3, 20, 20), 220, dtype=torch.uint8)
    crop[:, 4:8, 10:14] = 30  # a dark feature where the encoder looks; plain plasma elsewhere
    crop[:, 14:18, 2:6] = 30  # a dark decoy the encoder never reads
    sal = px.occlusion(_Window(), crop, score, row=1, target=0, patch=4, stride=2)
    assert sal.shape == (20, 20)
    y, x_ = px.peak(sal)
    assert 4 <= y < 8 and 10 <= x_ < 14  # the maximum on the feature
    assert np.all(sal[12:, :8] == 0)  # covering the decoy changes nothing
    assert sal.min() >= 0  # filling with plasma only lightens the feature here: every drop >= 0


def test_bag_score_kinds_explain_the_cell_attention_or_contribution() -> None:
    model = _Attn(4)
    x = torch.randn(6, 4)
    feats = torch.stack([x[2], x[2] * 3])  # row 2 unchanged, then scaled
    ptr = torch.tensor([0, 6])
    x3 = x.clone()
    x3[2] = x[2] * 3
    for i, bag in enumerate((x, x3)):
        out = model(bag, ptr)
        att = px.BagScore([model], x, kind="attention").value(feats, 2, 1)
        assert torch.allclose(att[i], torch.log(out.attention[2]), atol=1e-5)
        alone = model(bag[2:3], torch.tensor([0, 1])).logits[0, 1]
        con = px.BagScore([model], x, kind="contribution").value(feats, 2, 1)
        assert torch.allclose(con[i], out.attention[2] * alone, atol=1e-5)
        assert torch.allclose(px.BagScore([model], x).value(feats, 2, 1)[i], out.logits[0, 1], atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        px.BagScore([_Mean(4)], x, kind="attention").value(feats, 2, 1)  # a model without attention
    with pytest.raises(ValueError, match="score"):
        px.BagScore([model], x, kind="saliency")
    ig = px.integrated_gradients(_encoder(), torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8),
                                 px.BagScore([_Attn(8)], torch.randn(5, 8), kind="attention"), 2, 0, steps=128)
    assert abs(float(ig.attribution.sum()) - ig.delta) < 2e-4  # IG of the attention score is complete too


def test_erase_paints_a_region_with_its_surroundings_and_the_control_region_lies_elsewhere_in_the_cell() -> None:
    crop = np.full((30, 30, 3), 240, dtype=np.uint8)
    cell = np.zeros((30, 30), dtype=bool)
    cell[5:25, 5:25] = True
    crop[cell] = (200, 150, 180)  # cytoplasm
    mask = np.zeros_like(cell)
    mask[10:13, 8:16] = True
    crop[mask] = (90, 20, 60)  # an Auer-rod-like streak
    out = px.erase(crop, mask, cell)
    assert (out[mask] == (200, 150, 180)).all() and (out[~mask] == crop[~mask]).all()
    rng = np.random.default_rng(0)
    other = px.shifted_region(mask, cell, rng)
    assert other is not None and other.sum() == mask.sum() and not (other & mask).any() and cell[other].all()
    assert (px.shifted_region(cell, cell, rng) == cell).all()  # as large as the cell: only itself fits
    small = np.zeros_like(cell)
    small[14:16, 14:16] = True
    assert px.shifted_region(mask, small, rng) is None  # the mask does not fit in that 'cell'


def test_relevance_mass_beside_the_pointing_game() -> None:
    cell = np.zeros((20, 20), dtype=bool)
    cell[2:18, 2:18] = True
    mask = np.zeros_like(cell)
    mask[4:8, 4:8] = True
    even = cell.astype(np.float32)  # a map spread evenly over the cell scores its chance level
    pt = px.pointing_game(even, mask, cell=cell)
    assert pt.mass == pytest.approx(16 / 256) and pt.mass_chance == pytest.approx(16 / 256)
    inside = mask.astype(np.float32) - 0.5 * (~mask)  # negative evidence outside does not count
    assert px.pointing_game(inside, mask, cell=cell).mass == pytest.approx(1.0)
    assert px.pointing_game(np.zeros_like(even), mask, cell=cell).mass == 0.0


@pytest.mark.slow  # uses the toy_run fixture (synthesis, extraction, training)
def test_explain_pixels_by_occlusion_of_the_cell_attention(toy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from feature_cache.bank import open_reader
    from milcore.data.predictions import read_attention, read_predictions
    from milcore.trust.pixel_run import explain_pixels
    from milcore.trust.pixels import PixelConfig

    run = toy_run / "run"
    table, attention = read_predictions(run), read_attention(run)
    assert (PixelConfig().methods, PixelConfig().score) == (("integrated_gradients",), "attention")  # measured
    config = PixelConfig(methods=("occlusion",), score="attention", cells_per_patient=2, occlusion_patch=8)
    windows = []
    real = px.occlusion

    def spy(encoder, pixels, score, row, target, patch=12, stride=4, **kw):
        windows.append((int(pixels.shape[-1]), patch, stride))
        return real(encoder, pixels, score, row, target, patch, stride, **kw)

    monkeypatch.setattr(px, "occlusion", spy)
    with open_reader(toy_run / "bank.h5") as reader:
        res = explain_pixels(run, reader, table, attention, table.bag_ids, toy_run / "cohort", config)
    assert len(res.cells) == 2 * len(table.bag_ids)
    side = min(res.cells[0].crop.shape[:2])  # the patch and stride were given in crop pixels
    assert windows and set(windows) == {(s, *px.occlusion_window(8, 4, side, s)) for s, _, _ in windows}
    assert all(c.maps["occlusion"].shape == c.crop.shape[:2] and c.maps["occlusion"].min() >= 0 for c in res.cells)
    game = res.to_json()["pointing_game"]["occlusion"]
    assert game["cells"] > 0 and 0 <= game["mass"] <= 1 and 0 < game["mass_chance"] < 1
    assert res.to_json()["score"] == "attention"
    rc = main(["explain", "--run", str(run), "--out", str(tmp_path / "ex"), "--pixels", "--patients", "2",
               "--pixel-cells", "1"])  # fmt: skip  (the defaults: integrated gradients of the cell's attention)
    assert rc == 0, capsys.readouterr().err
    pix = json.loads((tmp_path / "ex" / "explain.json").read_text())["pixels"]
    assert pix["methods"] == ["integrated_gradients"] and pix["score"] == "attention"
    html = (tmp_path / "ex" / "explain.html").read_text()
    assert "own attention (bright = pixels that made the model pick this cell)" in html
    assert "relevance mass in the feature" in html
    assert main(["explain", "--run", str(run), "--out", str(tmp_path / "bad"), "--pixels", "--pixel-score", "x"]) == 2
    assert "pixel-score" in capsys.readouterr().err and not (tmp_path / "bad").exists()
