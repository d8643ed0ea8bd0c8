"""The synthetic cohort as a source: same cells as the written crop folders, without decoding PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources import create_source
from feature_cache.sources.synthetic import SynthConfig, write_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("src") / "cohort"
    write_cohort(SynthConfig(task="aml", patients=3, seed=2, bag_median=15, bag_range=(10, 25)), out)
    return out


def test_synthetic_source_equals_the_crop_folders(cohort: Path) -> None:
    synthetic, crops = create_source("synthetic", cohort), create_source("crops", cohort)
    assert synthetic.bag_ids() == crops.bag_ids()
    for bag in synthetic.bag_ids():
        a, b = synthetic.read_bag(bag), crops.read_bag(bag)
        assert a.cell_ids == b.cell_ids and np.array_equal(np.asarray(a.pixels), np.asarray(b.pixels))
        cells = list(synthetic.iter_cells(bag))
        assert [c.cell_id for c in cells] == a.cell_ids and all(c.cell_type for c in cells)
        assert np.array_equal(np.stack([c.pixels for c in cells]), a.pixels)


def test_config_file_and_errors(cohort: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("task: all\npatients: 2\nseed: 1\nbag_median: 12\nbag_range: [10, 20]\n")
    source = create_source("synthetic", cfg)
    assert len(source.bag_ids()) == 2 and source.bag_ids()[0].startswith("all-")
    with pytest.raises(InvalidArgumentError, match="no bag"):
        list(source.iter_cells("nobody"))
    with pytest.raises(UserError, match=r"no synth\.json"):
        create_source("synthetic", tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"task": "aml", "colour": 1}))
    with pytest.raises(UserError, match=r"unknown synthetic option\(s\) 'colour'"):
        create_source("synthetic", tmp_path / "bad.json")


def test_a_cohort_drawn_by_another_sampling_version_is_refused(cohort: Path, tmp_path: Path) -> None:
    """Re-rendering a folder written by an older generator would give other cells than its crops."""
    meta = json.loads((cohort / "synth.json").read_text())
    assert meta["sampling_version"] == 2
    old = tmp_path / "old"
    old.mkdir()
    del meta["sampling_version"]  # cohorts written before issue 14 recorded none (version 1)
    (old / "synth.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"sampling version 1.*this generator draws version 2.*--source crops"):
        create_source("synthetic", old)
