"""Galleries drawn from real crops, checked tile by tile, and drawing errors that surface.

Crops: a synthetic cohort written by ``milcore synth``; BloodMNIST cells and the white cells detected on
BCCD fields (``../shared/data``; those tests skip with the reason where it is absent), written as
``<root>/<bag>/<cell>.png`` the way ``--crops`` expects them. The predictions are planted (one chosen
cell per bag gets the highest attention), so the gallery's first tile must be that cell's pixels.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milcore.cli import main

TILE, PAD = 64, 2  # montage() defaults


def _bank_and_predictions(root: Path, cells: dict[str, list[str]], planted: dict[str, int]) -> Path:
    """A bank holding the cells' ids (random features) and a prediction folder whose attention peaks at
    ``planted[bag]``; returns the prediction folder."""
    from feature_cache.bank import EncoderInfo, open_writer
    from milcore.data.predictions import PredictionTable, write_attention, write_predictions

    rng = np.random.default_rng(0)
    info = EncoderInfo(name="toy", version="1", weights_sha256="", transform="none", dim=4)
    bags = sorted(cells)
    with open_writer(root / "bank.h5", info, mode="w") as w:
        for b in bags:
            w.append(b, rng.normal(size=(len(cells[b]), 4)).astype(np.float32), cell_id=cells[b])
    attention = []
    for b in bags:
        a = np.linspace(1.0, 2.0, len(cells[b]))  # distinct values: the ranking is unambiguous
        a[planted[b]] = 10.0
        attention.append((a / a.sum()).astype(np.float32))
    labels = np.arange(len(bags)) % 2
    proba = np.full((len(bags), 2), 0.2)
    proba[np.arange(len(bags)), labels] = 0.8
    pred = root / "pred"
    write_predictions(pred, PredictionTable(bags, ["control", "sick"], proba, labels, np.full(len(bags), -1)))
    write_attention(pred, bags, attention)
    (pred / "predictions.json").write_text(json.dumps({"bank": str(root / "bank.h5"), "cohort": None}))
    return pred


def _write_crops(root: Path, crops: dict[str, list[tuple[str, np.ndarray]]]) -> dict[str, list[str]]:
    for bag, items in crops.items():
        (root / bag).mkdir(parents=True)
        for cid, pixels in items:
            Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB").save(root / bag / f"{cid}.png")
    return {bag: [cid for cid, _ in items] for bag, items in crops.items()}


def _montages(rep) -> dict[str, tuple[np.ndarray, str]]:
    """Per patient: its montage (decoded) and the caption."""
    out = {}
    for block in rep.blocks:
        if block.kind == "png" and ": top-" in block.payload["caption"]:
            bag = block.payload["caption"].split(":")[0]
            out[bag] = (np.asarray(Image.open(io.BytesIO(block.payload["data"])).convert("RGB")),
                        block.payload["caption"])  # fmt: skip
    return out


def _tile(montage: np.ndarray, row: int, col: int) -> np.ndarray:
    y, x = PAD + row * (TILE + PAD), PAD + col * (TILE + PAD)
    return montage[y : y + TILE, x : x + TILE]


def _expected(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((TILE, TILE)))


def _check_galleries(pred: Path, crops: Path, cells: dict[str, list[str]], planted: dict[str, int]) -> dict:
    """The first tile of each patient is its planted cell's crop, and the last top tile the next-ranked one."""
    from milcore.explain import build_explanations

    rep, summary = build_explanations(pred, crops, top_k=3, max_patients=len(cells))
    montages = _montages(rep)
    assert set(montages) == set(cells) and summary["missing_crops"] == 0
    for bag, ids in cells.items():
        top = summary["patients"][bag]["top"]
        assert top[0][0] == ids[planted[bag]]
        image, _ = montages[bag]
        assert image.shape == (2 * (TILE + PAD) + PAD, 3 * (TILE + PAD) + PAD, 3)
        for col, (cid, _) in enumerate(top):
            assert np.array_equal(_tile(image, 0, col), _expected(crops / bag / f"{cid}.png")), (bag, cid)
        lowest = summary["patients"][bag]["lowest"][0][0]
        assert lowest == ids[0] and np.array_equal(_tile(image, 1, 0), _expected(crops / bag / f"{lowest}.png"))
    return summary


def test_galleries_of_a_synthetic_cohort_show_the_named_cells(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    assert main(["synth", "--task", "all", "--patients", "3", "--seed", "0", "--bag-median", "10", "--bag-min", "8",
                 "--bag-max", "12", "--crop-size", "48", "-q", str(cohort)]) == 0  # fmt: skip
    cells = {p.name: sorted(f.stem for f in p.glob("*.png")) for p in sorted(cohort.iterdir()) if p.is_dir()}
    planted = {bag: len(ids) // 2 for bag, ids in cells.items()}
    pred = _bank_and_predictions(tmp_path, cells, planted)
    _check_galleries(pred, cohort, cells, planted)

    # a missing crop is a crossed grey tile, named in the caption and in the summary, never another cell
    from milcore.explain import _missing_tile, build_explanations

    bag = sorted(cells)[0]
    gone = cells[bag][planted[bag]]
    (cohort / bag / f"{gone}.png").unlink()
    rep, summary = build_explanations(pred, cohort, top_k=3, max_patients=len(cells))
    image, caption = _montages(rep)[bag]
    assert np.array_equal(_tile(image, 0, 0), _missing_tile(TILE))
    assert f"MISSING crops (crossed tiles): {bag}/{gone}" in caption
    assert summary["patients"][bag]["missing_crops"] == [f"{bag}/{gone}"] and summary["missing_crops"] >= 1


def test_galleries_of_real_bloodmnist_cells(bloodmnist_npz: Path, tmp_path: Path) -> None:
    from feature_cache.sources.bloodmnist import BloodMnistBags, BloodMnistSource, make_bloodmnist_bags

    config = BloodMnistBags(split="test", bags=3, witness="erythroblast", witness_range=(0.2, 0.2), seed=0,
                            bag_range=(8, 12))  # fmt: skip
    source = BloodMnistSource(make_bloodmnist_bags(bloodmnist_npz, tmp_path / "bags", config))
    crops = {b: [(c.cell_id, c.pixels) for c in source.iter_cells(b)] for b in source.bag_ids()}
    cells = _write_crops(tmp_path / "crops", crops)
    planted = {bag: 1 for bag in cells}
    pred = _bank_and_predictions(tmp_path, cells, planted)
    _check_galleries(pred, tmp_path / "crops", cells, planted)
    assert next(iter(crops.values()))[0][1].shape == (28, 28, 3), "real BloodMNIST pixels, upsampled in the tiles"


def test_galleries_of_white_cells_detected_on_bccd_fields(bccd_small: Path, tmp_path: Path) -> None:
    from feature_cache.sources import create_source

    source = create_source("fields", bccd_small, cells="wbc")
    crops = {b: [(c.cell_id, c.pixels) for c in source.iter_cells(b)] for b in source.bag_ids()}
    crops = {b: items for b, items in crops.items() if len(items) >= 1}
    assert crops, "the detector found no white cell on the BCCD fields"
    cells = _write_crops(tmp_path / "crops", crops)
    planted = {bag: len(ids) - 1 for bag, ids in cells.items()}
    pred = _bank_and_predictions(tmp_path, cells, planted)
    from milcore.explain import build_explanations

    rep, summary = build_explanations(pred, tmp_path / "crops", top_k=3, max_patients=len(cells))
    montages = _montages(rep)
    for bag, ids in cells.items():  # one or two cells per field: top and lowest rows hold every cell
        image, _ = montages[bag]
        top = summary["patients"][bag]["top"]
        assert top[0][0] == ids[planted[bag]] and len(top) == len(ids)
        for col, (cid, _) in enumerate(top):
            assert np.array_equal(_tile(image, 0, col), _expected(tmp_path / "crops" / bag / f"{cid}.png"))


def test_a_drawing_error_in_the_run_report_is_not_swallowed(
    planted_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: 'cell galleries skipped' in the log, the report without them, and exit code 0."""
    from milcore.crossval import train_run
    from milcore.report import plots
    from milcore.training.config import RunSpec, TrainConfig

    planted = planted_factory(tmp_path / "bank", n_bags=12, sizes=(10, 20))

    def broken(*args, **kwargs):
        raise ValueError("a drawing bug")

    monkeypatch.setattr(plots, "embedding_figure", broken)
    spec = RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=20)
    config = TrainConfig(model="mean", epochs=1, patience=1, min_epochs=1, device="cpu")
    with pytest.raises(ValueError, match="a drawing bug"):
        train_run(spec, config, tmp_path / "run")


def test_an_expected_gallery_problem_is_said_in_the_run_report(
    planted_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from feature_cache.errors import UserError
    from milcore import explain
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    planted = planted_factory(tmp_path / "bank", n_bags=12, sizes=(10, 20))

    def refused(*args, **kwargs):
        raise UserError("crops/p000: no crop found for any of the 16 cells")

    monkeypatch.setattr(explain, "build_explanations", refused)
    spec = RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=20)
    train_run(spec, TrainConfig(model="mean", epochs=1, patience=1, min_epochs=1, device="cpu"), tmp_path / "run")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Cell galleries not drawn: crops/p000: no crop found for any of the 16 cells" in report
