"""Resuming an extraction checks each stored bag's source (issue 13, item 3: a wrong result with exit 0)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from feature_cache.bank import open_reader, open_writer
from feature_cache.extract import ExtractConfig, extract, shard_path
from feature_cache.sources.base import ORIGIN_COLUMNS, BagOrigin
from feature_cache.sources.synthetic import SynthConfig, write_cohort
from milcore.cli import main

SMALL = {"bag_median": 12, "bag_range": (10, 20)}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    a, b = root / "a", root / "b"
    write_cohort(SynthConfig(task="aml", patients=4, seed=0, **SMALL), a)
    write_cohort(SynthConfig(task="aml", patients=4, seed=1, **SMALL), b)
    return a, b


def _cli(source: Path, out: Path, *extra: str, kind: str = "crops") -> int:
    return main(["extract", "--source", kind, "--input", str(source), "--encoder", "toy", "--out", str(out),
                 "--workers", "0", "-q", *extra])  # fmt: skip


def _features(bank: Path) -> dict[str, bytes]:
    with open_reader(bank) as reader:
        return {b: reader.read(b).tobytes() for b in reader.bag_ids()}


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_resume_from_another_crop_folder_with_the_same_bag_ids_is_refused(
    suffix: str, cohorts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = cohorts
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == sorted(p.name for p in b.iterdir() if p.is_dir())
    out = tmp_path / f"x{suffix}"
    assert _cli(a, out) == 0
    before = _features(out)
    capsys.readouterr()
    assert _cli(b, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{out}: bag aml-0001: recorded from {(a / 'aml-0001').resolve()} (" in err
    assert f"now {(b / 'aml-0001').resolve()} (" in err and "files)" in err
    assert "3 more bags differ" in err and "--overwrite" in err
    assert _features(out) == before, "the bank is untouched"
    assert not Path(str(out) + ".journal").exists(), "a refused resume leaves no journal"
    # --overwrite re-extracts from the new folder
    assert _cli(b, out, "--overwrite") == 0
    assert _features(out) != before
    assert _cli(b, out) == 0  # and that bank resumes from b


def test_each_bag_records_its_origin_and_a_moved_folder_still_resumes(cohorts: tuple[Path, Path], tmp_path: Path):
    a, _ = cohorts
    moved = tmp_path / "moved"
    shutil.copytree(a, moved, copy_function=shutil.copy2)  # same names, sizes and modification times
    out = tmp_path / "bank.h5"
    extract(ExtractConfig(source="crops", input=str(a), encoder="toy", out=str(out), num_workers=0))
    with open_reader(out) as reader:
        assert set(ORIGIN_COLUMNS) <= set(reader.bag_meta)
        i = reader.index_of("aml-0002")
        meta = {k: reader.bag_meta[k][i] for k in ORIGIN_COLUMNS}
    assert meta["source_kind"] == "crops" and meta["source_path"] == str((a / "aml-0002").resolve())
    assert int(meta["source_items"]) == len(list((a / "aml-0002").glob("*.png")))
    again = extract(ExtractConfig(source="crops", input=str(moved), encoder="toy", out=str(out), num_workers=0))
    assert again.bags_skipped == 4 and again.bags_written == 0


def test_a_changed_file_in_the_same_folder_is_refused(cohorts: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = cohorts
    src = tmp_path / "src"
    shutil.copytree(a, src, copy_function=shutil.copy2)
    out = tmp_path / "bank.h5"
    assert _cli(src, out) == 0
    victim = sorted((src / "aml-0003").glob("*.png"))[0]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten a second later
    from feature_cache.errors import UserError

    with pytest.raises(UserError, match=r"bag aml-0003: recorded from .*aml-0003 \(\d+ files\), whose files changed"):
        extract(ExtractConfig(source="crops", input=str(src), encoder="toy", out=str(out), num_workers=0))


def test_synthetic_cohort_with_another_config_is_refused(cohorts: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    a, b = cohorts
    out = tmp_path / "syn.h5"
    assert _cli(a, out, kind="synthetic") == 0
    capsys.readouterr()
    assert _cli(b, out, kind="synthetic") == 2
    err = capsys.readouterr().err
    assert "bag aml-0001: recorded with other source settings (seed 0 -> 1)" in err
    assert _cli(a, out, kind="crops") == 2  # same cells, but another kind of source: not assumed equal
    assert "recorded from a synthetic source" in capsys.readouterr().err


def test_field_images_with_other_detection_settings_are_refused(tmp_path: Path, capsys) -> None:
    from PIL import Image, ImageDraw

    fields = tmp_path / "fields"
    fields.mkdir()
    field = Image.new("RGB", (640, 480), (230, 220, 225))  # glass, one white cell (cytoplasm, violet nucleus)
    ImageDraw.Draw(field).ellipse((250, 170, 370, 290), fill=(205, 175, 205))
    ImageDraw.Draw(field).ellipse((270, 190, 350, 270), fill=(80, 30, 120))
    field.save(fields / "f1.png")
    out = tmp_path / "fields.h5"
    assert _cli(fields, out, "--cells", "wbc", kind="fields") == 0
    assert _cli(fields, out, "--cells", "wbc", kind="fields") == 0
    capsys.readouterr()
    assert _cli(fields, out, "--cells", "rbc", kind="fields") == 2
    assert "bag f1: recorded with other source settings (cells 'wbc' -> 'rbc', crop_size 240 -> 140)" in (
        capsys.readouterr().err
    )


def _strip_origins(bank: Path, out: Path) -> None:
    """A bank as an older milcore wrote it: same bags and features, no source_* metadata."""
    with open_reader(bank) as reader, open_writer(out, reader.info, "x", dtype=str(reader.dtype)) as writer:
        for bag in reader.bag_ids():
            x = reader.read(bag)
            writer.append(bag, x, reader.read_coords(bag), cell_id=reader.read_column(bag, "cell_id"),
                          meta={"n_cells": len(x)})  # fmt: skip


def test_a_bank_without_records_is_refused_unless_accepted(
    cohorts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = cohorts
    first = tmp_path / "half.h5"
    extract(ExtractConfig(source="crops", input=str(a), encoder="toy", out=str(first), num_workers=0, shard=(0, 2)))
    old = tmp_path / "old.h5"
    _strip_origins(shard_path(first, 0, 2), old)
    capsys.readouterr()
    assert _cli(a, old) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 of the 2 bags already there" in err and "--accept-unrecorded" in err
    assert len(open_reader(old)) == 2 and not Path(str(old) + ".journal").exists()
    assert _cli(a, old, "--accept-unrecorded") == 0
    assert "cannot be checked" in capsys.readouterr().err  # still said, as a warning
    with open_reader(old) as reader:
        assert len(reader) == 4
        kinds = dict(zip(reader.bag_ids(), reader.bag_meta["source_kind"], strict=True))
    assert sorted(b for b, k in kinds.items() if k == "crops") == ["aml-0002", "aml-0004"]  # new bags: recorded


def test_merged_shards_keep_the_record(cohorts: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    a, b = cohorts
    for i in range(2):
        extract(ExtractConfig(source="crops", input=str(a), encoder="toy", out=str(tmp_path / "s.h5"), num_workers=0,
                              shard=(i, 2)))  # fmt: skip
    merged = tmp_path / "merged.h5"
    shards = [str(shard_path(tmp_path / "s.h5", i, 2)) for i in range(2)]
    assert main(["bank", "merge", *shards, "--out", str(merged), "-q"]) == 0
    with open_reader(merged) as reader:
        origins = [BagOrigin.from_meta({k: reader.bag_meta[k][i] for k in ORIGIN_COLUMNS}) for i in range(len(reader))]
    assert all(o is not None and o.kind == "crops" for o in origins)
    assert _cli(a, merged) == 0
    capsys.readouterr()
    assert _cli(b, merged) == 2
    assert "bag aml-0001: recorded from" in capsys.readouterr().err


def test_origin_difference_wording() -> None:
    rec = BagOrigin("crops", "/a/P003", 112, "{}", "d1")
    assert rec.difference(BagOrigin("crops", "/b/P003", 97, "{}", "d2", unit="files")) == (
        "recorded from /a/P003 (112 files), now /b/P003 (97 files)"
    )
    assert rec.difference(BagOrigin("crops", "/b/P003", 112, "{}", "d1")) is None  # moved, same files
    assert BagOrigin.from_meta({"source_digest": ""}) is None
    assert BagOrigin.from_meta(rec.to_meta()) == rec
    assert np.isscalar(rec.to_meta()["source_items"])
