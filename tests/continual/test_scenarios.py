"""Scenarios: class-, domain- and temporal-incremental streams, and tasks lacking a class."""

from __future__ import annotations

import numpy as np
import pytest

from feature_cache.errors import UserError
from milcore.continual.scenarios import build_scenario, holdout_split
from milcore.data.cohort import read_cohort


def test_class_incremental(stream_bank):
    cohort = read_cohort(stream_bank["cohort"], "dx", classes=["c2", "c3", "c0", "c1"])
    s = build_scenario(cohort, {"kind": "class_incremental", "tasks": [["c2", "c3"], ["c0", "c1"]]})
    assert s.classes == ("c2", "c3", "c0", "c1") and s.num_tasks == 2
    assert s.tasks[0].classes == (0, 1) and s.tasks[1].classes == (2, 3)
    assert s.seen_classes(0) == 2 and s.seen_classes(1) == 4
    for t in s.tasks:
        assert not set(t.train_ids) & set(t.test_ids)
        assert set(t.train_labels) == set(t.test_labels) == set(t.classes)
    assert s.describe()["tasks"][0]["classes"] == ["c2", "c3"]


def test_class_incremental_rejects_bad_tasks(stream_bank):
    cohort = read_cohort(stream_bank["cohort"], "dx", classes=["c0", "c1", "c2", "c3"])
    with pytest.raises(UserError, match="not in the cohort: 'c9'"):
        build_scenario(cohort, {"kind": "class_incremental", "tasks": [["c0", "c9"]]})
    with pytest.raises(UserError, match="more than one task"):
        build_scenario(cohort, {"kind": "class_incremental", "tasks": [["c0", "c1"], ["c1", "c2"]]})
    with pytest.raises(UserError, match="scenario: kind must be one of"):
        build_scenario(cohort, {"kind": "nope"})


def test_domain_incremental_by_site(stream_bank):
    cohort = read_cohort(stream_bank["cohort"], "dx")
    s = build_scenario(cohort, {"kind": "domain_incremental", "column": "site"})
    assert [t.name for t in s.tasks] == ["site 0", "site 1"]
    assert all(t.classes == (0, 1, 2, 3) for t in s.tasks)
    sites = dict(zip(cohort.bag_ids, cohort.columns["site"], strict=True))
    assert {sites[b] for b in s.tasks[1].train_ids + s.tasks[1].test_ids} == {"1"}


def test_temporal_periods(stream_bank):
    cohort = read_cohort(stream_bank["cohort"], "dx")
    s = build_scenario(cohort, {"kind": "temporal", "column": "date", "periods": 2})
    assert s.num_tasks == 2
    dates = dict(zip(cohort.bag_ids, cohort.columns["date"], strict=True))
    first = max(dates[b] for b in s.tasks[0].train_ids + s.tasks[0].test_ids)
    second = min(dates[b] for b in s.tasks[1].train_ids + s.tasks[1].test_ids)
    assert first < second
    total = sum(len(t.train_ids) + len(t.test_ids) for t in s.tasks)
    assert total == len(cohort)


def test_task_without_samples_of_a_class(stream_bank, tmp_path):
    lines = stream_bank["cohort"].read_text().splitlines()
    # drop class c3 from site 1: the site-1 task has no samples of it
    kept = [ln for ln in lines if not (ln.split(",")[1] == "c3" and ln.split(",")[2] == "1")]
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join(kept) + "\n")
    cohort = read_cohort(path, "dx")
    with pytest.raises(UserError, match="task 'site 1' has no training samples of class 'c3'"):
        build_scenario(cohort, {"kind": "domain_incremental", "column": "site"})


def test_holdout_split_is_stratified_and_grouped():
    labels = np.repeat([0, 1], 10)
    groups = np.array([f"p{i // 2}" for i in range(20)])  # two bags per patient
    test = holdout_split(labels, groups, 0.4, seed=3)
    for g in np.unique(groups):
        assert len(set(test[groups == g])) == 1  # a patient never straddles the split
    assert test[labels == 0].sum() == 4 and test[labels == 1].sum() == 4
    np.testing.assert_array_equal(test, holdout_split(labels, groups, 0.4, seed=3))


def test_restrict_classes_drops_other_bags_and_relabels(stream_bank):
    from milcore.continual.scenarios import restrict_classes

    cohort = read_cohort(stream_bank["cohort"], "dx")
    sub = restrict_classes(cohort, ["c3", "c1"])
    assert sub.classes == ("c3", "c1") and len(sub) == 24
    original = dict(zip(cohort.bag_ids, cohort.labels, strict=True))
    for bag, label in zip(sub.bag_ids, sub.labels, strict=True):
        assert cohort.classes[original[bag]] == sub.classes[label]
    with pytest.raises(UserError, match="not in the cohort: 'c9'"):
        restrict_classes(cohort, ["c9"])
