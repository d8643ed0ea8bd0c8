"""The generator's ground truth for explanations: attributes in cells.csv, diagnostic-feature masks, confounds.

The first test proves that recording the truth changed nothing that was there before: the crops (per-crop
channel means and standard deviations), the first six columns of ``cells.csv`` and ``cohort.csv`` of three
tiny cohorts equal ``synthetic_before_issue16.json``, computed with the generator of commit 1f1f37a
(before attributes, masks and confounds existed). Means are compared to 1e-3 grey levels: a single pixel
off by one level moves a 96 px crop's mean by 1e-4, any re-drawn random number moves it by whole levels.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from feature_cache.errors import InvalidArgumentError
from feature_cache.sources.synthetic import SynthConfig, SyntheticCohort, parse_bias, parse_confound, write_cohort
from feature_cache.sources.synthetic_attributes import (
    ATTRIBUTE_COLUMNS,
    RED_ATTRIBUTES,
    WHITE_ATTRIBUTES,
    CellTruth,
    phrase,
)
from feature_cache.sources.synthetic_render import AUER, CellRenderer
from feature_cache.sources.synthetic_truth import cohort_masks, read_masks
from feature_cache.sources.synthetic_vocab import CELL_TYPES, TASKS

REFERENCE = Path(__file__).with_name("synthetic_before_issue16.json")
SMALL = {"bag_median": 20, "bag_range": (10, 40), "witness_median": 0.25}


def _reference_config(name: str, data: dict) -> SynthConfig:
    cfg = dict(data["config"])
    cfg["biases"] = [parse_bias(b) for b in cfg["biases"]]
    return SynthConfig.from_dict(cfg)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", ["aml", "anemia", "all"])
def test_pixels_and_existing_columns_are_those_of_the_generator_before(name: str, tmp_path: Path) -> None:
    ref = json.loads(REFERENCE.read_text())[name]
    config = _reference_config(name, ref)
    assert config.to_dict() == ref["config"], "a cohort without confounds keeps its configuration text"
    write_cohort(config, tmp_path / "c")
    lines = list(csv.reader((tmp_path / "c" / "cells.csv").read_text().splitlines()))
    six = "".join(",".join(r[:6]) + "\n" for r in lines)
    assert hashlib.sha256(six.encode()).hexdigest() == ref["cells_csv_sha256"]
    cohort_text = (tmp_path / "c" / "cohort.csv").read_text()
    assert hashlib.sha256(cohort_text.encode()).hexdigest() == ref["cohort_csv_sha256"]
    cohort = SyntheticCohort(config)
    stats = []
    for p in cohort.patients:
        bag = cohort.render_bag(p).astype(np.float64)
        stats += [(*c.mean(axis=(0, 1)), *c.std(axis=(0, 1))) for c in bag]
    assert np.allclose(np.asarray(stats), np.asarray(ref["crops"]), atol=1e-3)


@pytest.mark.parametrize("cell_type", CELL_TYPES)
@pytest.mark.parametrize("subtlety", [0.0, 0.7])
def test_recording_the_truth_draws_nothing_and_changes_no_pixel(cell_type: str, subtlety: float) -> None:
    renderer = CellRenderer(96, seed=4)
    a_rng, b_rng = np.random.default_rng(11), np.random.default_rng(11)
    plain = renderer.render(cell_type, a_rng, subtlety)
    truth = CellTruth()
    traced = renderer.render(cell_type, b_rng, subtlety, truth=truth)
    assert np.array_equal(plain, traced)
    assert a_rng.bit_generator.state == b_rng.bit_generator.state
    lineage = "rbc" if truth.lineage == "rbc" else "wbc"
    attrs = truth.attributes()
    assert tuple(attrs) == ATTRIBUTE_COLUMNS[lineage]
    table = WHITE_ATTRIBUTES if lineage == "wbc" else RED_ATTRIBUTES
    assert all(value in table[name] for name, value in attrs.items())
    assert truth.masks["cell"].any()


def test_attributes_follow_the_cell_types() -> None:
    renderer = CellRenderer(96, seed=0)

    def attrs(cell_type: str, n: int = 12) -> list[dict[str, str]]:
        out = []
        rng = np.random.default_rng(3)
        for _ in range(n):
            t = CellTruth(keep_masks=False)
            renderer.render(cell_type, rng, truth=t)
            out.append(t.attributes())
        return out

    assert all(a["auer_rods"] == "yes" and a["chromatin"] == "fine" for a in attrs("myeloblast_auer"))
    assert all(a["auer_rods"] == "no" and a["nc_ratio"] == "high" for a in attrs("lymphoblast"))
    assert all(a["nucleus_shape"] == "multilobed" and a["granularity"] == "yes" for a in attrs("neutrophil"))
    assert all(a["granule_colour"] == "orange" and a["granule_type"] == "coarse" for a in attrs("eosinophil"))
    assert all(a["cell_size"] == "small" for a in attrs("lymphocyte"))
    assert all(a["cell_shape"] == "sickle" for a in attrs("sickle_cell"))
    assert all(a["central_pallor"] == "increased" for a in attrs("microcytic_hypochromic"))
    assert phrase("nc_ratio", "high") == "high N:C ratio" and phrase("auer_rods", "yes") == "Auer rods"
    assert phrase("stain", "odd") == "stain: odd"


@pytest.fixture(scope="module")
def aml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "aml"
    write_cohort(SynthConfig(task="aml", patients=10, seed=5, **SMALL), out)
    return out


def test_cells_csv_holds_the_attributes_and_masks_h5_the_diagnostic_features(aml: Path) -> None:
    rows = _rows(aml / "cells.csv")
    assert list(rows[0])[6:] == ["diagnostic_feature", *ATTRIBUTE_COLUMNS["wbc"]]
    masks = read_masks(aml / "masks.h5")
    diagnostic = {(r["patient_id"], r["cell_id"]): r for r in rows if r["is_diagnostic"] == "1"}
    assert set(masks) == {k for k, r in diagnostic.items() if r["diagnostic_feature"]}
    assert len(masks) >= 0.9 * len(diagnostic)
    assert all(r["diagnostic_feature"] == "" for r in rows if r["is_diagnostic"] == "0")
    features = {m.feature for m in masks.values()}
    assert {"nucleus", "granules", "auer_rod"} <= features
    from PIL import Image

    for (bag, cid), m in masks.items():
        assert m.feature == diagnostic[(bag, cid)]["diagnostic_feature"]
        assert m.mask.any() and m.cell.any()
        assert (m.mask & ~m.cell).sum() <= 0.05 * m.mask.sum() + 2, "the feature lies inside the cell"
        pixels = np.asarray(Image.open(aml / bag / f"{cid}.png").convert("RGB")).astype(float)
        inside = pixels[m.mask].mean(axis=0)
        rest = pixels[m.cell & ~m.mask].mean(axis=0) if (m.cell & ~m.mask).any() else inside
        if m.feature == "auer_rod":  # the rod's crimson: red well above blue, unlike the blue cytoplasm
            assert inside[0] - inside[2] > rest[0] - rest[2] and abs(inside - np.asarray(AUER)).sum() < 260
        elif m.feature in ("nucleus", "granules"):  # darker than the rest of the cell
            assert inside.mean() < rest.mean()


def test_masks_re_rendered_from_synth_json_equal_masks_h5(aml: Path, tmp_path: Path) -> None:
    stored = read_masks(aml / "masks.h5")
    bags = sorted({b for b, _ in stored})[:3]
    copy = tmp_path / "old"
    copy.mkdir()
    (copy / "synth.json").write_text((aml / "synth.json").read_text())  # a cohort written before masks.h5
    again = cohort_masks(copy, [*bags, "not-a-patient"])
    expected = {k: v for k, v in stored.items() if k[0] in bags}
    assert set(again) == set(expected)
    for k, v in expected.items():
        assert again[k].feature == v.feature
        assert np.array_equal(again[k].mask, v.mask) and np.array_equal(again[k].cell, v.cell)


def test_workers_write_the_same_truth(aml: Path, tmp_path: Path) -> None:
    write_cohort(SynthConfig(task="aml", patients=10, seed=5, **SMALL), tmp_path / "w", workers=2)
    assert (tmp_path / "w" / "cells.csv").read_text() == (aml / "cells.csv").read_text()
    a, b = read_masks(aml / "masks.h5"), read_masks(tmp_path / "w" / "masks.h5")
    assert set(a) == set(b) and all(np.array_equal(a[k].mask, b[k].mask) for k in a)


def test_red_cell_cohorts_write_red_cell_attributes(tmp_path: Path) -> None:
    write_cohort(SynthConfig(task="anemia", patients=6, seed=2, **SMALL), tmp_path / "a")
    rows = _rows(tmp_path / "a" / "cells.csv")
    assert list(rows[0])[6:] == ["diagnostic_feature", *ATTRIBUTE_COLUMNS["rbc"]]
    assert {r["diagnostic_feature"] for r in rows if r["is_diagnostic"] == "1"} == {"cell"}
    assert {r["cell_shape"] for r in rows if r["cell_type"] == "discocyte"} == {"disc"}


def test_a_planted_site_confound_moves_only_the_site() -> None:
    base = SynthConfig(task="aml", patients=40, seed=1, sites=5, **SMALL)
    full = base.replace(confounds=(parse_confound("site:1"),))
    part = base.replace(confounds=(parse_confound("site:0.5"),))
    classes = TASKS["aml"].classes
    plain, always, half = (SyntheticCohort(c).patients for c in (base, full, part))
    for a, b in zip(plain, always, strict=True):
        assert b.site == classes.index(b.label) % 5
        assert (a.label, a.age, a.sex, a.date, a.n_cells, a.n_diagnostic) == (b.label, b.age, b.sex, b.date,
                                                                              b.n_cells, b.n_diagnostic)
    follows = np.mean([p.site == classes.index(p.label) % 5 for p in half])
    assert 0.45 < follows < 0.95
    dated = SyntheticCohort(base.replace(confounds=(parse_confound("date:1"),))).patients
    months = {p.label: set() for p in dated}
    for p in dated:
        months[p.label].add(p.date[:7])
    assert all(len(m) <= 3 for m in months.values()), "each class acquired in its own fifth of the year"
    assert [p.site for p in dated] == [p.site for p in plain]


def test_confound_round_trips_and_bad_confounds_are_refused(tmp_path: Path) -> None:
    cfg = SynthConfig(task="aml", patients=3, sites=2, bag_median=10, bag_range=(5, 20),
                      confounds=(parse_confound("site:0.8"),))  # fmt: skip
    assert cfg.to_dict()["confounds"] == ["site:0.8"]
    assert SynthConfig.from_dict(cfg.to_dict()) == cfg
    assert "confounds" not in cfg.replace(confounds=()).to_dict()
    for text in ("site", "age:0.5", "site:x", "site:1.5"):
        with pytest.raises(InvalidArgumentError):
            parse_confound(text)
    with pytest.raises(InvalidArgumentError, match="at least 2 sites"):
        SynthConfig(task="aml", confounds=(parse_confound("site:0.8"),))
    with pytest.raises(InvalidArgumentError, match="one confound per column"):
        SynthConfig(task="aml", sites=2, confounds=(parse_confound("site:0.8"), parse_confound("site:0.2")))


def test_cli_plants_a_confound(tmp_path: Path) -> None:
    from milcore.cli import main

    out = tmp_path / "c"
    assert main(["synth", str(out), "--task", "all", "--patients", "6", "--bag-median", "10", "--sites", "2",
                 "--confound", "site:1", "-q"]) == 0  # fmt: skip
    rows = _rows(out / "cohort.csv")
    assert all(r["site"] == ("0" if r["all"] == "control" else "1") for r in rows)
    assert json.loads((out / "synth.json").read_text())["config"]["confounds"] == ["site:1"]


def test_union_masks_cover_the_first_feature_and_add_the_cells_other_diagnostic_features(aml: Path) -> None:
    from feature_cache.sources.synthetic_source import load_synth_config
    from feature_cache.sources.synthetic_truth import render_masks

    stored = read_masks(aml / "masks.h5")
    bags = sorted({b for b, _ in stored})[:3]
    union = render_masks(load_synth_config(aml), bags, union=True)
    assert set(union) == {k for k in stored if k[0] in bags}
    grew = 0
    for k, m in union.items():
        first = stored[k].mask
        assert m.feature == stored[k].feature and np.array_equal(m.cell, stored[k].cell)
        assert np.all(m.mask[first]), "the union holds the first feature's mask"
        grew += int(m.mask.sum() > first.sum())
    assert grew > 0, "some cell (a myeloblast with an Auer rod) carries a second diagnostic feature"
