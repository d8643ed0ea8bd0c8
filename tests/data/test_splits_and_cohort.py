"""Cohort tables and patient-level splits: leakage, stratification, determinism, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feature_cache.errors import UserError
from milcore.data.cohort import join_bank, read_cohort
from milcore.data.splits import Fold, check_no_leakage, load_folds, make_folds, save_folds


def _ids(n: int) -> list[str]:
    return [f"p{i:03d}" for i in range(n)]


def test_folds_are_a_partition_with_rotating_validation() -> None:
    labels = np.repeat([0, 1, 2], 20)
    folds = make_folds(_ids(60), labels, k=5, seed=0)
    tests = [set(f.test) for f in folds]
    assert set().union(*tests) == set(_ids(60)) and sum(len(t) for t in tests) == 60
    for i, f in enumerate(folds):
        assert set(f.val) == tests[(i + 1) % 5]
        assert not (set(f.train) & set(f.val)) and not (set(f.train) & set(f.test))
        assert len(f.train) + len(f.val) + len(f.test) == 60
        per_class = np.bincount(labels[[int(b[1:]) for b in f.test]], minlength=3)
        assert per_class.tolist() == [4, 4, 4]


def test_same_seed_same_folds_other_seed_other_folds() -> None:
    labels = np.repeat([0, 1], 15)
    assert make_folds(_ids(30), labels, seed=3) == make_folds(_ids(30), labels, seed=3)
    assert make_folds(_ids(30), labels, seed=3) != make_folds(_ids(30), labels, seed=4)


def test_patients_with_several_smears_never_leak() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat([f"pat{i}" for i in range(25)], rng.integers(1, 4, 25))
    labels = np.asarray([int(g[3:]) % 2 for g in groups])
    ids = [f"smear{i}" for i in range(len(groups))]
    folds = make_folds(ids, labels, k=5, seed=1, groups=groups)
    group_of = dict(zip(ids, groups, strict=True))
    check_no_leakage(folds, group_of)
    for f in folds:
        assert not ({group_of[b] for b in f.test} & {group_of[b] for b in f.train})


def test_leakage_is_detected() -> None:
    bad = [Fold(0, ("a", "b"), ("c",), ("a",))]
    with pytest.raises(UserError, match="'a' is in both train and test"):
        check_no_leakage(bad)


def test_too_few_patients_for_the_folds() -> None:
    with pytest.raises(UserError, match="class 'rare' has 3 patients, fewer than the 5 folds"):
        make_folds(_ids(13), np.array([0] * 10 + [1] * 3), k=5, classes=["common", "rare"])


def test_split_file_round_trip(tmp_path: Path) -> None:
    folds = make_folds(_ids(20), np.repeat([0, 1], 10), k=4)
    save_folds(folds, tmp_path / "splits.json", {"seed": 0})
    assert load_folds(tmp_path / "splits.json") == folds
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserError, match="not a milcore splits file"):
        load_folds(tmp_path / "other.json")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_cohort_and_join(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "patient_id,aml,age,sex\np1,NPM1,60,F\np2,control,50,M\np3,,40,F\np4,NPM1,70,M\n"
    table = _write(tmp_path / "c.csv", text)
    cohort = read_cohort(table, "aml")
    assert cohort.classes == ("control", "NPM1") and list(cohort.bag_ids) == ["p1", "p2", "p4"]
    assert cohort.labels.tolist() == [1, 0, 1] and cohort.columns["sex"].tolist() == ["F", "M", "M"]
    joined, report = join_bank(cohort, ["p1", "p2", "p9"])
    assert list(joined.bag_ids) == ["p1", "p2"]
    assert report.only_in_cohort == ["p4"] and report.only_in_bank == ["p9"]
    assert "1 labelled bags are not in the bank" in caplog.text
    with pytest.raises(UserError, match="not in the bank"):
        join_bank(cohort, ["p1"], strict=True)


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("patient_id,sex\np1,F\n", {}, "no label column 'aml'"),
        ("name,aml\np1,NPM1\n", {}, "no bag-id column"),
        ("patient_id,aml\np1,NPM1\np1,control\n", {}, "duplicate bag ids"),
        ("patient_id,aml\np1,CLL\n", {"classes": ["control", "NPM1"]}, "labels CLL"),
        ("patient_id,aml\np1,\n", {}, "no labelled rows"),
    ],
)
def test_bad_cohort_tables(tmp_path: Path, text: str, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        read_cohort(_write(tmp_path / "c.csv", text), "aml", **kwargs)


def test_missing_table_and_no_overlap(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cohort table not found"):
        read_cohort(tmp_path / "none.csv", "aml")
    cohort = read_cohort(_write(tmp_path / "c.csv", "bag_id,all\nx,ALL\n"), "all")
    with pytest.raises(UserError, match="no bag id in common"):
        join_bank(cohort, ["y"])
