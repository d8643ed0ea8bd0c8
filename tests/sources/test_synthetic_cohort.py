"""The synthetic cohort: layout, determinism, ground truth, bag sizes, biases, sites, atomic writes."""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from feature_cache.errors import InvalidArgumentError, OutputExistsError, UserError
from feature_cache.sources import synthetic
from feature_cache.sources.synthetic import SynthConfig, SyntheticCohort, encode_png, parse_bias, write_cohort
from feature_cache.sources.synthetic_vocab import TASKS

SMALL = {"bag_median": 20, "bag_range": (10, 40)}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "synth.json"}  # fmt: skip


@pytest.fixture(scope="module")
def aml_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "aml"
    write_cohort(SynthConfig(task="aml", patients=10, seed=3, **SMALL), out)
    return out


def test_layout_and_ground_truth_agree(aml_cohort: Path) -> None:
    patients = _read_csv(aml_cohort / "cohort.csv")
    cells = _read_csv(aml_cohort / "cells.csv")
    assert len(patients) == 10
    assert set(patients[0]) >= {"patient_id", "aml", "age", "sex", "site", "date", "split", "fold"}
    by_patient: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in cells:
        by_patient[row["patient_id"]].append(row)
    for p in patients:
        pid, label = p["patient_id"], p["aml"]
        files = sorted(f.stem for f in (aml_cohort / pid).glob("*.png"))
        rows = by_patient[pid]
        assert files == sorted(r["cell_id"] for r in rows) and len(files) == int(p["n_cells"])
        diag = [r for r in rows if r["is_diagnostic"] == "1"]
        assert len(diag) == int(p["n_diagnostic"])
        if label == "control":
            assert not diag
        else:
            assert diag, f"{pid} ({label}) has no diagnostic cell"
            allowed = set(TASKS["aml"].mixtures[label])
            assert {r["cell_type"] for r in diag} <= allowed
            assert abs(len(diag) / len(rows) - float(p["witness_rate"])) <= 1.0 / len(rows) + 1e-6
        assert p["sex"] in {"F", "M"} and 18 <= int(p["age"]) <= 90 and p["split"] in {"train", "val", "test"}
    with Image.open(next((aml_cohort / patients[0]["patient_id"]).glob("*.png"))) as img:
        assert img.size == (96, 96) and img.mode == "RGB"


def test_same_seed_same_bytes_and_workers_do_not_matter(tmp_path: Path, aml_cohort: Path) -> None:
    again = tmp_path / "again"
    write_cohort(SynthConfig(task="aml", patients=10, seed=3, **SMALL), again, workers=2)
    assert _tree_bytes(again) == _tree_bytes(aml_cohort)
    other = tmp_path / "other"
    write_cohort(SynthConfig(task="aml", patients=10, seed=4, **SMALL), other)
    assert _tree_bytes(other) != _tree_bytes(aml_cohort)


def test_patient_does_not_depend_on_cohort_size() -> None:
    small = SyntheticCohort(SynthConfig(task="all", patients=10, seed=9, sites=3, **SMALL))
    large = SyntheticCohort(SynthConfig(task="all", patients=25, seed=9, sites=3, **SMALL))
    assert small.patients == large.patients[:10]  # label, age, sex, site, date, fold, size, rate, ...
    for i in (0, 7):
        a, b = small.cells(small.patients[i]), large.cells(large.patients[i])
        assert np.array_equal(a.cell_type, b.cell_type) and np.array_equal(a.coords, b.coords)
    assert np.array_equal(small.render_bag(small.patients[7]), large.render_bag(large.patients[7]))


@settings(max_examples=30, deadline=None)
@given(
    task=st.sampled_from(sorted(TASKS)),
    seed=st.integers(0, 2**31),
    sizes=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    folds=st.integers(3, 6),
    bias=st.sampled_from([(), ("sex=F:0.5",), ("age=60-90:subtle=0.4",)]),
)
def test_every_patient_record_is_a_prefix_property(
    task: str, seed: int, sizes: tuple[int, int], folds: int, bias: tuple[str, ...]
) -> None:
    def cohort(n: int) -> list:
        cfg = SynthConfig(task=task, patients=n, seed=seed, folds=folds, biases=tuple(map(parse_bias, bias)))
        return SyntheticCohort(cfg).patients

    small, large = sorted(sizes)
    a, b = cohort(small), cohort(large)
    assert a == b[:small]
    for records in (a, b):  # classes balanced within one, fold hints stratified within one per class
        counts = Counter(p.label for p in records)
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len(counts) == min(len(records), len(TASKS[task].classes))
        for cls in counts:
            per_fold = Counter(p.fold for p in records if p.label == cls)
            spread = [per_fold.get(f, 0) for f in range(folds)]
            assert max(spread) - min(spread) <= 1


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_has_balanced_classes_and_its_cell_lineage(task: str) -> None:
    cohort = SyntheticCohort(SynthConfig(task=task, patients=24, seed=1, **SMALL))
    counts = Counter(p.label for p in cohort.patients)
    assert set(counts) == set(TASKS[task].classes)
    assert max(counts.values()) - min(counts.values()) <= 1
    lineage = TASKS[task].lineage
    types = {str(t) for p in cohort.patients for t in cohort.cells(p).cell_type}
    vocab = synthetic.list_cell_types(lineage)
    assert types <= set(vocab)


def test_bag_sizes_are_heavy_tailed_around_the_median() -> None:
    cohort = SyntheticCohort(SynthConfig(task="aml", patients=2000, seed=0))
    sizes = np.array([p.n_cells for p in cohort.patients])
    assert 260 <= np.median(sizes) <= 340
    assert sizes.min() >= 10 and sizes.max() <= 2000
    assert (sizes >= 1000).mean() > 0.03  # a real tail
    assert (sizes <= 60).mean() > 0.005


def test_witness_rate_knob_and_controls() -> None:
    cohort = SyntheticCohort(SynthConfig(task="aml", patients=500, seed=2, witness_median=0.1))
    sick = [p for p in cohort.patients if p.label != "control"]
    assert 0.08 <= np.median([p.witness_rate for p in sick]) <= 0.12
    assert all(p.n_diagnostic == 0 for p in cohort.patients if p.label == "control")


def test_planted_sex_bias_halves_the_female_rate() -> None:
    cfg = SynthConfig(task="aml", patients=1000, seed=5, biases=(parse_bias("sex=F:0.5"),))
    sick = [p for p in SyntheticCohort(cfg).patients if p.label != "control"]
    female = np.median([p.witness_rate for p in sick if p.sex == "F"])
    male = np.median([p.witness_rate for p in sick if p.sex == "M"])
    assert 0.4 <= female / male <= 0.6
    assert all(p.biased == (p.sex == "F") for p in sick)


def test_subtle_age_bias_raises_subtlety_only_in_the_band() -> None:
    cfg = SynthConfig(task="all", patients=200, seed=5, biases=(parse_bias("age=72-86:subtle=0.6"),))
    for p in SyntheticCohort(cfg).patients:
        assert p.subtlety == (0.6 if 72 <= p.age <= 86 else 0.0)


@pytest.mark.parametrize(
    "text",
    ["sex=X:0.5", "sex=F", "height=F:0.5", "age=80-70:0.5", "sex=F:-1", "site=a:0.5", "sex=F:subtle=2"],
)
def test_bad_bias_texts_are_rejected(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_bias(text)


def test_bias_on_a_missing_site_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="site 3 does not exist"):
        SynthConfig(sites=2, biases=(parse_bias("site=3:0.5"),))


@pytest.mark.parametrize(
    "kwargs",
    [{"task": "cll"}, {"patients": 0}, {"bag_range": (50, 10)}, {"subtlety": 1.5}, {"witness_median": 0.9},
     {"sites": 0}, {"seed": -1}],
)  # fmt: skip
def test_invalid_config_values(kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        SynthConfig(**kwargs)


def test_sites_change_the_pixels_not_the_cells() -> None:
    cohort = SyntheticCohort(SynthConfig(task="aml", patients=2, seed=0, sites=3, **SMALL))
    assert cohort.site_style(0) == synthetic.SyntheticCohort(cohort.config).site_style(0)
    assert cohort.site_style(1) != cohort.site_style(2)
    rng = np.random.default_rng(0)
    ref = cohort.renderer.render("neutrophil", np.random.default_rng(0), 0.0, cohort.site_style(0))
    shifted = cohort.renderer.render("neutrophil", np.random.default_rng(0), 0.0, cohort.site_style(1))
    assert np.abs(ref.astype(float) - shifted.astype(float)).mean() > 5
    assert rng is not None


def test_existing_output_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_cohort(SynthConfig(patients=2, **SMALL), out)
    assert (out / "keep.txt").read_text() == "precious"
    write_cohort(SynthConfig(patients=2, **SMALL), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "cohort.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cohort"]


def test_failure_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synthetic.encode_png

    def flaky(img: np.ndarray, level: int = 1) -> bytes:
        calls["n"] += 1
        if calls["n"] > 25:
            raise RuntimeError("disk full")
        return real(img, level)

    monkeypatch.setattr(synthetic, "encode_png", flaky)
    with pytest.raises(RuntimeError):
        write_cohort(SynthConfig(patients=3, **SMALL), tmp_path / "cohort")
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        write_cohort(SynthConfig(patients=1, **SMALL), blocker / "cohort")


def test_png_encoder_round_trips() -> None:
    img = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(img))).convert("RGB"))
    assert np.array_equal(decoded, img)
