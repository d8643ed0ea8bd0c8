"""Extraction: every source into a bank, resume after a kill, shards equal one run, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from feature_cache.bank import open_reader
from feature_cache.errors import UserError
from feature_cache.extract import ExtractConfig, extract, shard_path
from feature_cache.sources.synthetic import SynthConfig, write_cohort
from milcore.cli import main

SMALL = {"bag_median": 12, "bag_range": (10, 20)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("extract") / "cohort"
    write_cohort(SynthConfig(task="aml", patients=8, seed=4, **SMALL), out)
    return out


def _cfg(source: str, path: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(source=source, input=str(path), encoder="toy", out=str(out), num_workers=0, **kw)


def _features(bank: Path) -> dict[str, np.ndarray]:
    reader = open_reader(bank)
    return {b: reader.read(b) for b in reader.bag_ids()}


def test_crop_folder_to_bank_keeps_ids_types_and_coords(cohort: Path, tmp_path: Path) -> None:
    summary = extract(_cfg("crops", cohort, tmp_path / "bank.h5"))
    reader = open_reader(tmp_path / "bank.h5")
    assert summary.bags_written == 8 and len(reader) == 8 and summary.cells == reader.num_instances
    bag = reader.bag_ids()[0]
    stems = sorted(p.stem for p in (cohort / bag).glob("*.png"))
    assert list(reader.read_column(bag, "cell_id")) == stems
    assert set(reader.read_column(bag, "cell_type")) <= {"neutrophil", "band", "lymphocyte", "monocyte", "eosinophil",
                                                         "basophil", "atypical_lymphocyte", "myeloblast",
                                                         "myeloblast_auer", "abnormal_promyelocyte", "monoblast",
                                                         "abnormal_eosinophil"}  # fmt: skip
    assert (reader.read_coords(bag) >= 0).all()
    log = [json.loads(line) for line in (tmp_path / "bank.h5.extract.jsonl").read_text().splitlines()]
    assert sum("bag" in row for row in log) == 8 and log[-1]["run"]["cells"] == summary.cells


def test_synthetic_source_gives_the_same_bank_as_its_crops(cohort: Path, tmp_path: Path) -> None:
    extract(_cfg("crops", cohort, tmp_path / "a.h5"))
    extract(_cfg("synthetic", cohort, tmp_path / "b.h5"))
    a, b = _features(tmp_path / "a.h5"), _features(tmp_path / "b.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_shards_merge_into_the_single_run_bank(cohort: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.h5"
    extract(_cfg("crops", cohort, single))
    for i in range(3):
        extract(_cfg("crops", cohort, tmp_path / "bank.h5", shard=(i, 3)))
    shards = [str(shard_path(tmp_path / "bank.h5", i, 3)) for i in range(3)]
    assert main(["bank", "merge", *shards, "--out", str(tmp_path / "merged.h5"), "-q"]) == 0
    one, merged = _features(single), _features(tmp_path / "merged.h5")
    assert one.keys() == merged.keys()
    assert all(one[k].tobytes() == merged[k].tobytes() for k in one), "features must be byte-equal"


def test_rerun_resumes_and_skips_done_bags(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "bank.h5"
    extract(_cfg("crops", cohort, out, shard=None))
    again = extract(_cfg("crops", cohort, out))
    assert again.bags_written == 0 and again.bags_skipped == 8


_KILL_SCRIPT = """
import sys, time
from feature_cache import extract as ex
from feature_cache.extract import ExtractConfig, extract
real = ex._BagItems.__getitem__
def slow(self, i):
    time.sleep(0.3)
    return real(self, i)
ex._BagItems.__getitem__ = slow
extract(ExtractConfig(source="crops", input=sys.argv[1], encoder="toy", out=sys.argv[2], num_workers=0))
"""


def test_killed_run_resumes_to_the_same_bank(cohort: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean.h5"
    extract(_cfg("crops", cohort, clean))
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(cohort), str(out)])
    log = Path(str(out) + ".extract.jsonl")
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.read_text().count('"bag"') < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "no finished bank before close"
    resumed = extract(_cfg("crops", cohort, out))
    assert resumed.bags_skipped >= 3 and resumed.bags_skipped + resumed.bags_written == 8
    a, b = _features(clean), _features(out)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_bank_of_another_encoder_is_refused(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bank.h5"
    extract(_cfg("crops", cohort, out))
    code = main(["extract", "--source", "crops", "--input", str(cohort), "--encoder", "morphology", "--out", str(out),
                 "--workers", "0"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "morphology" in err or "encoder" in err
    assert len(open_reader(out)) == 8, "the existing bank is untouched"


def test_unreadable_images_are_skipped_counted_and_named(cohort: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cohort, broken)
    bag = sorted(p for p in broken.iterdir() if p.is_dir())[0]
    victim = sorted(bag.glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    summary = extract(_cfg("crops", broken, tmp_path / "bank.h5"))
    assert summary.failures == 1 and summary.bags_written == 8
    log = (tmp_path / "bank.h5.extract.jsonl").read_text()
    assert victim.name in log


def test_cli_extract_and_bad_arguments(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.zarr"
    assert main(["extract", "--source", "synthetic", "--input", str(cohort), "--encoder", "toy", "--out", str(out),
                 "--workers", "0", "-q"]) == 0  # fmt: skip
    assert len(open_reader(out)) == 8
    assert main(["extract", "--source", "crops", "--input", str(cohort), "--encoder", "tyo", "--out",
                 str(tmp_path / "x.h5")]) == 2  # fmt: skip
    assert "unknown encoder" in capsys.readouterr().err
    assert main(["extract", "--source", "crops", "--input", str(cohort), "--encoder", "toy", "--out",
                 str(tmp_path / "y.h5"), "--shard", "3/2"]) == 2  # fmt: skip
    assert main(["extract", "--source", "crops", "--input", str(cohort), "--encoder", "toy", "--out",
                 str(tmp_path / "z.h5"), "--cells", "wbc"]) == 2  # fmt: skip
    with pytest.raises(UserError):
        extract(_cfg("crops", tmp_path / "missing", tmp_path / "m.h5"))


def test_fields_and_slides_on_real_smears(bccd_small: Path, tmp_path: Path) -> None:
    from feature_cache.sources.image_io import read_rgb
    from feature_cache.sources.pyramid_tiff import write_pyramidal_tiff

    summary = extract(_cfg("fields", bccd_small / "JPEGImages", tmp_path / "fields.h5", cells="wbc"))
    reader = open_reader(tmp_path / "fields.h5")
    assert summary.bags_written == 4 and all(n >= 1 for n in reader.bag_sizes())
    slides = tmp_path / "slides"
    slides.mkdir()
    field = read_rgb(bccd_small / "JPEGImages" / "BloodImage_00000.jpg")
    write_pyramidal_tiff(slides / "smear1.tif", np.concatenate([field, field[:, ::-1]], axis=1), mpp=0.25)
    extract(_cfg("slides", slides, tmp_path / "slides.h5", cells="wbc"))
    reader = open_reader(tmp_path / "slides.h5")
    assert reader.bag_ids() == ["smear1"] and reader.bag_sizes()[0] >= 2
    coords = reader.read_coords("smear1")
    assert coords[:, 0].max() > field.shape[1]  # level-0 pixels across the mosaic
