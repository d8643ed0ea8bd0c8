"""Bad input: every case raises a one-line error naming the file and the problem, and loses nothing."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from feature_cache.bank import (
    BankError,
    BankFormatError,
    BankLockedError,
    EncoderInfo,
    EncoderMismatchError,
    UnknownBagError,
    open_reader,
    open_writer,
)
from feature_cache.bank.verify import verify_bank
from feature_cache.errors import UserError


def _one_line(exc: pytest.ExceptionInfo, path) -> str:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    assert isinstance(exc.value, UserError)
    return message


def test_missing_and_foreign_files(tmp_path):
    for path in (tmp_path / "absent.h5", tmp_path / "absent.zarr"):
        with pytest.raises(BankFormatError) as exc:
            open_reader(path)
        assert "no such bank" in _one_line(exc, path)
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f["features"] = np.zeros((3, 4))
    with pytest.raises(BankFormatError) as exc:
        open_reader(foreign)
    assert "not a feature bank" in _one_line(exc, foreign)
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(BankFormatError) as exc:
        open_reader(text)
    assert "not a readable HDF5 file" in _one_line(exc, text)
    folder = tmp_path / "empty.zarr"
    folder.mkdir()
    with pytest.raises(BankFormatError) as exc:
        open_reader(folder)
    assert "zarr.json" in _one_line(exc, folder)
    with pytest.raises(BankError, match="unknown bank type"):
        open_reader(tmp_path / "bank.npy")


def test_wrong_format_version(tmp_path, info, make_bags, write_bank):
    path = write_bank(tmp_path / "bank.h5", make_bags(3), info)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = "2.0"
    with pytest.raises(BankFormatError) as exc:
        open_reader(path)
    assert "format_version '2.0' is not supported" in _one_line(exc, path)


def test_bad_appends_are_rejected_and_nothing_is_lost(tmp_path, info, suffix, make_bags):
    path = tmp_path / f"bank{suffix}"
    bags = make_bags(4)
    with open_writer(path, info) as writer:
        for b in bags[:2]:
            writer.append(b.bag_id, b.features, b.coords, meta=b.meta)
        cases = [
            (dict(bag_id="wide", features=np.zeros((3, 17))), "expected \\(n, 16\\)"),
            (dict(bag_id=bags[0].bag_id, features=bags[0].features), "duplicate bag id"),
            (dict(bag_id="nan", features=np.full((2, 16), np.nan)), "2 NaN/Inf"),
            (dict(bag_id="inf", features=np.array([[np.inf] + [0.0] * 15])), "1 NaN/Inf"),
            (dict(bag_id="overflow", features=np.full((1, 16), 1e6)), "NaN/Inf.*float16"),
            (dict(bag_id="coords", features=np.zeros((3, 16)), coords=np.zeros((2, 2))), "coords have shape"),
            (dict(bag_id="meta", features=np.zeros((1, 16)), meta={"site": 3}), "meta 'site' is a str column"),
            (dict(bag_id="meta2", features=np.zeros((1, 16)), meta={"x": [1]}), "must be a bool, int, float or str"),
            (dict(bag_id="", features=np.zeros((1, 16))), "non-empty"),
            (dict(bag_id="types", features=np.zeros((2, 16)), cell_type=["a"]), "1 cell types for 2 cells"),
        ]
        for kwargs, pattern in cases:
            with pytest.raises(BankError, match=pattern) as exc:
                writer.append(**kwargs)
            _one_line(exc, path)
        writer.append("empty", np.zeros((0, 16)))  # empty bags are allowed
        writer.append(bags[2].bag_id, bags[2].features, bags[2].coords, meta=bags[2].meta)
    with open_reader(path) as reader:
        assert reader.bag_ids() == [bags[0].bag_id, bags[1].bag_id, "empty", bags[2].bag_id]
        assert reader.read("empty").shape == (0, 16)
        np.testing.assert_array_equal(reader.read(bags[2].bag_id), bags[2].features.astype(np.float16))
    assert verify_bank(path).ok


def test_unknown_bag_id(tmp_path, info, suffix, make_bags, write_bank):
    path = write_bank(tmp_path / f"bank{suffix}", make_bags(2), info)
    with open_reader(path) as reader:
        with pytest.raises(UnknownBagError) as exc:
            reader.read("nobody")
        assert "unknown bag id 'nobody'" in _one_line(exc, path)
        with pytest.raises(UnknownBagError):
            reader.read_packed(["nobody"])


def test_second_writer_is_refused(tmp_path, info, suffix, make_bags):
    path = tmp_path / f"bank{suffix}"
    bags = make_bags(2)
    first = open_writer(path, info)
    first.append(bags[0].bag_id, bags[0].features)
    for mode in ("a", "w", "x"):
        with pytest.raises(BankLockedError) as exc:
            open_writer(path, info, mode=mode)
        assert "already open for writing" in _one_line(exc, path)
    first.append(bags[1].bag_id, bags[1].features)
    first.close()
    with open_writer(path, info, mode="a") as again:
        assert len(again) == 2
    with open_reader(path) as reader:
        assert len(reader) == 2


def test_bad_writer_arguments(tmp_path, info):
    with pytest.raises(BankError, match="unknown writer mode"):
        open_writer(tmp_path / "b.h5", info, mode="r")
    with pytest.raises(BankError, match="lzf is an HDF5 filter"):
        open_writer(tmp_path / "b.zarr", info, compression="lzf")
    with pytest.raises(BankError, match="unknown compression"):
        open_writer(tmp_path / "b.h5", info, compression="snappy")
    with pytest.raises(BankError, match="dtype must be float16 or float32"):
        open_writer(tmp_path / "b.h5", info, dtype="int8")
    with pytest.raises(BankError, match="EncoderInfo is needed"):
        open_writer(tmp_path / "b.h5")
    assert not list(tmp_path.iterdir())  # failed opens leave nothing behind


def test_append_with_other_encoder(tmp_path, info, make_bags, write_bank):
    path = write_bank(tmp_path / "bank.zarr", make_bags(2), info)
    other = EncoderInfo("toy", "1.0", "cd" * 32, "resize=64", 16)
    with pytest.raises(EncoderMismatchError) as exc:
        open_writer(path, other, mode="a")
    assert "weights_sha256" in _one_line(exc, path)


def test_verify_reports_precise_problems(tmp_path, info, make_bags, write_bank):
    bags = make_bags(6)
    path = write_bank(tmp_path / "bank.h5", bags, info, checksum=True)
    assert verify_bank(path).ok
    with h5py.File(path, "r+") as f:
        x = f["instances/features"]
        row = int(f["indexes/bag_offset"][4])
        x[row, 0] = np.nan  # bag 4
        x[int(f["indexes/bag_offset"][1]), 1] += 1  # bag 1: silent corruption
    report = verify_bank(path)
    text = " | ".join(report.problems)
    assert not report.ok and len(report.problems) == 2
    assert f"NaN/Inf feature values in 1 bags: '{bags[4].bag_id}'" in text
    assert f"checksum mismatch in 2 bags: '{bags[1].bag_id}'" in text  # bag 4 changed as well
    with h5py.File(path, "r+") as f:
        offsets = f["indexes/bag_offset"]
        offsets[2], offsets[3] = offsets[3], offsets[2]
    report = verify_bank(path)
    assert any(f"decreases at bag 2 ('{bags[2].bag_id}')" in p for p in report.problems)
    with pytest.raises(BankFormatError, match="decreases at bag 2"):
        open_reader(path)
