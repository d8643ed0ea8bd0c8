"""Issue 13: a damaged bank is refused (on open, on read and by ``verify``), never read as zeros.

Missing, short, long and undecodable chunk files; truncated HDF5 files; arrays of the wrong dtype or
shape; removed attributes; checksums (CRC-32C by default, CRC-32 of older banks) on verify and on
whole-bag reads; and ``bank info`` while a writer is running.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from feature_cache.bank import BankFormatError, open_reader, open_writer
from feature_cache.bank.checksum import default_algorithm
from feature_cache.bank.convert import convert_bank
from feature_cache.bank.verify import verify_bank
from feature_cache.errors import UserError
from milcore.cli import main


def _zarr(tmp_path, info, make_bags, write_bank, **kwargs) -> tuple[Path, list]:
    bags = make_bags(8)
    path = write_bank(tmp_path / "bank.zarr", bags, info, chunk_rows=16, **kwargs)
    return path, bags


def _refused(exc: pytest.ExceptionInfo, *words: str) -> str:
    message = str(exc.value)
    assert isinstance(exc.value, UserError) and "\n" not in message
    for word in words:
        assert word in message, message
    return message


def _cli_verify_fails(path, capsys, *words: str) -> None:
    capsys.readouterr()
    assert main(["bank", "verify", str(path)]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


# -- Zarr chunk files ----------------------------------------------------------------------------
def test_missing_feature_chunk_is_refused_not_read_as_zeros(tmp_path, info, make_bags, write_bank, capsys):
    path, _ = _zarr(tmp_path, info, make_bags, write_bank)
    (path / "instances/features/c.0.0").unlink()
    for io in ("auto", "library"):
        with pytest.raises(BankFormatError) as exc:
            open_reader(path, io=io)
        _refused(exc, str(path), "instances/features", "c.0.0", "missing")
    report = verify_bank(path)
    assert not report.ok and any("c.0.0" in p and "missing" in p for p in report.problems)
    _cli_verify_fails(path, capsys, "c.0.0", "missing")


@pytest.mark.parametrize("io", ["auto", "library"])
def test_chunk_removed_or_truncated_after_open_fails_on_read(tmp_path, info, make_bags, write_bank, io):
    path, bags = _zarr(tmp_path, info, make_bags, write_bank)
    reader = open_reader(path, io=io)
    (path / "instances/features/c.1.0").unlink()
    chunk = path / "instances/features/c.2.0"
    os.truncate(chunk, chunk.stat().st_size // 2)
    with pytest.raises(BankFormatError) as exc:
        for b in bags:
            reader.read(b.bag_id)
    _refused(exc, "instances/features", "c.")
    with pytest.raises(BankFormatError):
        reader.read_rows(0, reader.num_instances)
    reader.close()


@pytest.mark.parametrize("change", ["short", "long"])
def test_resized_chunk_is_refused(tmp_path, info, make_bags, write_bank, change, capsys):
    path, _ = _zarr(tmp_path, info, make_bags, write_bank)
    chunk = path / "instances/features/c.1.0"
    size = chunk.stat().st_size
    if change == "short":
        os.truncate(chunk, size - 2)
    else:
        with open(chunk, "ab") as fh:
            fh.write(b"\0" * 32)
    with pytest.raises(BankFormatError) as exc:
        open_reader(path)
    _refused(exc, str(path), "c.1.0", f"{size}")
    _cli_verify_fails(path, capsys, "c.1.0")


def test_undecodable_compressed_chunk(tmp_path, info, make_bags, write_bank, capsys):
    path, bags = _zarr(tmp_path, info, make_bags, write_bank, compression="blosc-zstd")
    (path / "instances/features/c.1.0").write_bytes(b"not a blosc frame" * 3)
    for io in ("auto", "library"):
        with open_reader(path, io=io) as reader, pytest.raises(BankFormatError) as exc:
            for b in bags:
                reader.read(b.bag_id)
        _refused(exc, "instances/features", "c.1.0")
    _cli_verify_fails(path, capsys, "c.1.0")


@pytest.mark.parametrize("io", ["auto", "library"])
def test_truncated_blosc_chunk_is_refused_not_decoded_to_garbage(tmp_path, info, make_bags, write_bank, io, capsys):
    """Blosc trusts its header: a truncated frame decodes to garbage without an error (found by the fuzz suite)."""
    path, bags = _zarr(tmp_path, info, make_bags, write_bank, compression="blosc-zstd", checksum=False)
    chunk = path / "instances/features/c.1.0"
    os.truncate(chunk, chunk.stat().st_size - 5)
    with open_reader(path, io=io) as reader, pytest.raises(BankFormatError) as exc:
        for b in bags:
            reader.read(b.bag_id)
    _refused(exc, "instances/features", "c.1.0", "Blosc header")
    _cli_verify_fails(path, capsys, "c.1.0", "Blosc header")


@pytest.mark.parametrize("array", ["instances/coords", "instances/cell_id", "instances/cell_type",
                                   "indexes/bag_offset", "bags/bag_id", "bags/checksum", "bags/site"])
def test_missing_chunk_of_any_array_is_refused(tmp_path, info, make_bags, write_bank, array, capsys):
    path, _ = _zarr(tmp_path, info, make_bags, write_bank, checksum=True)
    chunks = [p for p in (path / array).iterdir() if p.name != "zarr.json"]
    assert chunks, f"{array} has no chunk file"
    chunks[0].unlink()
    with pytest.raises(BankFormatError) as exc:
        open_reader(path)
    _refused(exc, str(path), array, "missing")
    _cli_verify_fails(path, capsys, array)


def test_every_chunk_is_written_even_when_it_holds_only_the_fill_value(tmp_path, info):
    path = tmp_path / "zeros.zarr"
    with open_writer(path, info, "x", chunk_rows=4, compression="blosc-zstd") as w:
        for i in range(3):
            w.append(f"b{i}", np.zeros((5, info.dim)), np.zeros((5, 2)), cell_type=["blast"] * 5,
                     cell_id=[""] * 5, meta={"n": 0, "ok": False, "score": 0.0})
    for array in ("instances/features", "instances/coords", "instances/cell_type", "instances/cell_id",
                  "bags/n", "bags/ok", "bags/score"):
        assert [p.name for p in (path / array).iterdir() if p.name != "zarr.json"], array
    with open_reader(path) as reader:
        assert float(np.abs(reader.read("b1")).sum()) == 0.0
        assert list(reader.read_column("b1", "cell_type")) == ["blast"] * 5
    assert verify_bank(path).ok


def test_a_bank_without_bags_still_opens(tmp_path, info):
    for suffix in (".h5", ".zarr"):
        path = tmp_path / f"empty{suffix}"
        open_writer(path, info, "x").close()
        with open_reader(path) as reader:
            assert len(reader) == 0
        assert verify_bank(path).ok


# -- HDF5 -----------------------------------------------------------------------------------------
def test_truncated_hdf5_file(tmp_path, info, make_bags, write_bank, capsys):
    path = write_bank(tmp_path / "bank.h5", make_bags(6), info)
    size = path.stat().st_size
    for keep in (size - 100, size // 2, 70_000):
        os.truncate(path, keep)
        with pytest.raises(BankFormatError) as exc:
            open_reader(path)
        _refused(exc, str(path))
        _cli_verify_fails(path, capsys, str(path))


def test_hdf5_truncated_after_open_fails_on_read(tmp_path, info, make_bags, write_bank):
    bags = make_bags(6)
    path = write_bank(tmp_path / "bank.h5", bags, info)
    reader = open_reader(path)
    os.truncate(path, 65_536 + 100)
    with pytest.raises(BankFormatError) as exc:
        for b in bags:
            reader.read(b.bag_id)
    _refused(exc, str(path), "instances/features", "truncated")
    reader.close()


@pytest.mark.parametrize(
    "array, dtype",
    [("instances/coords", "float64"), ("instances/coords", "int64"), ("instances/cell_type", "int32"),
     ("instances/cell_id", "int8"), ("bags/checksum", "int64"), ("bags/bag_id", "int64"),
     ("bags/site", "int64"), ("indexes/bag_offset", "float64")],
)
def test_wrong_dtype_is_refused(tmp_path, info, make_bags, write_bank, array, dtype, capsys):
    path = write_bank(tmp_path / "bank.h5", make_bags(5), info, checksum=True)
    with h5py.File(path, "r+") as f:
        old = f[array]
        values, attrs = old[()], dict(old.attrs)
        if array == "bags/bag_id":
            values = np.arange(len(values))
        del f[array]
        new = f.create_dataset(array, data=np.asarray(values).astype(dtype) if array != "bags/site"
                               else np.arange(len(values)))
        new.attrs.update(attrs)
    with pytest.raises(BankFormatError) as exc:
        open_reader(path)
    _refused(exc, str(path), array)
    _cli_verify_fails(path, capsys, array)


@pytest.mark.parametrize("array, attr", [("bags/checksum", "algorithm"), ("instances/cell_type", "names"),
                                         ("bags/site", "kind")])
def test_removed_attribute_is_refused(tmp_path, info, make_bags, write_bank, suffix, array, attr, capsys):
    path = write_bank(tmp_path / f"bank{suffix}", make_bags(5), info, checksum=True)
    if suffix == ".h5":
        with h5py.File(path, "r+") as f:
            del f[array].attrs[attr]
    else:
        meta = json.loads((path / array / "zarr.json").read_text())
        del meta["attributes"][attr]
        (path / array / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(BankFormatError) as exc:
        open_reader(path)
    _refused(exc, str(path), array, attr)
    _cli_verify_fails(path, capsys, attr)


def test_features_shorter_than_the_offsets(tmp_path, info, make_bags, write_bank, capsys):
    path = write_bank(tmp_path / "bank.h5", make_bags(5), info)
    with h5py.File(path, "r+") as f:
        x = f["instances/features"][:-3]
        del f["instances/features"]
        f["instances/features"] = x
    with pytest.raises(BankFormatError) as exc:
        open_reader(path)
    _refused(exc, str(path), "bag_offset")
    _cli_verify_fails(path, capsys, "bag_offset")


def test_cell_type_codes_outside_the_names_are_refused(tmp_path, info, make_bags, write_bank, suffix):
    bags = make_bags(4)
    path = write_bank(tmp_path / f"bank{suffix}", bags, info)
    if suffix == ".h5":
        with h5py.File(path, "r+") as f:
            f["instances/cell_type"][0] = 40
    else:
        import zarr

        zarr.open_array(path / "instances/cell_type", mode="r+")[0] = 40
    with open_reader(path) as reader, pytest.raises(BankFormatError) as exc:
        reader.read_column(bags[0].bag_id, "cell_type")
    _refused(exc, str(path), "cell_type", "40")
    assert any("cell_type" in p for p in verify_bank(path).problems)


# -- checksums ------------------------------------------------------------------------------------
def test_new_banks_have_checksums_by_default(tmp_path, info, make_bags, write_bank, suffix):
    path = write_bank(tmp_path / f"bank{suffix}", make_bags(4), info)
    hardware = default_algorithm() == "crc32c"  # google-crc32c with its C extension (x86-64, arm64 wheels)
    with open_reader(path) as reader:
        assert (reader.checksum_algorithm == "crc32c") if hardware else reader.checksums is None
    report = verify_bank(path)
    assert report.ok and report.checksums_checked == (4 if hardware else 0)
    explicit = write_bank(tmp_path / f"crc{suffix}", make_bags(4), info, checksum=True)
    with open_reader(explicit) as reader:
        assert reader.checksum_algorithm == default_algorithm() and len(reader.checksums) == 4


def test_old_crc32_banks_still_verify(tmp_path, info, make_bags, write_bank):
    bags = make_bags(4)
    path = write_bank(tmp_path / "old.h5", bags, info, checksum=True)
    with h5py.File(path, "r+") as f:  # as format 1.1 wrote them: zlib CRC-32
        f["bags/checksum"][...] = [zlib.crc32(np.ascontiguousarray(b.features.astype(np.float16))) for b in bags]
        f["bags/checksum"].attrs["algorithm"] = "crc32"
        f.attrs["format_version"] = "1.1"
    report = verify_bank(path)
    assert report.ok and report.checksums_checked == 4
    with h5py.File(path, "r+") as f:
        f["bags/checksum"][1] ^= 1
    assert any("checksum mismatch" in p and bags[1].bag_id in p for p in verify_bank(path).problems)


def test_unknown_checksum_algorithm_is_refused(tmp_path, info, make_bags, write_bank):
    path = write_bank(tmp_path / "bank.h5", make_bags(3), info, checksum=True)
    with h5py.File(path, "r+") as f:
        f["bags/checksum"].attrs["algorithm"] = "md5"
    with pytest.raises(BankFormatError) as exc:
        open_reader(path)
    _refused(exc, str(path), "md5")


def _flip_feature_byte(path: Path, row: int) -> None:
    with h5py.File(path, "r") as f:
        ds = f["instances/features"]
        offset = ds.id.get_offset() + row * ds.shape[1] * ds.dtype.itemsize
    with open(path, "r+b") as fh:
        fh.seek(offset + 1)
        byte = fh.read(1)[0]
        fh.seek(offset + 1)
        fh.write(bytes([byte ^ 0x10]))


def test_whole_bag_reads_check_checksums(tmp_path, info, make_bags, write_bank, capsys):
    bags = make_bags(5)
    path = write_bank(tmp_path / "bank.h5", bags, info, checksum=True)
    _flip_feature_byte(path, 0)  # inside the first bag's rows
    with open_reader(path) as reader:
        with pytest.raises(BankFormatError) as exc:
            reader.read(bags[0].bag_id)
        _refused(exc, str(path), bags[0].bag_id, "checksum")
        with pytest.raises(BankFormatError):
            reader.read_packed([bags[1].bag_id, bags[0].bag_id])
        reader.read(bags[1].bag_id)  # the others still read
    with open_reader(path, checksums=False) as reader:
        reader.read(bags[0].bag_id)
    _cli_verify_fails(path, capsys, "checksum mismatch", bags[0].bag_id)


def test_every_reader_of_rows_surfaces_the_error(tmp_path, info, make_bags, write_bank, capsys):
    """convert/merge/export and the training FeatureStore read through the reader API."""
    from milcore.data.store import FeatureStore

    path, bags = _zarr(tmp_path, info, make_bags, write_bank)
    reader = open_reader(path)
    (path / "instances/features/c.0.0").unlink()
    store = FeatureStore(reader, [b.bag_id for b in bags])  # features are read on first use
    for _ in range(2):  # and a second use after the failed first one fails the same way
        with pytest.raises(BankFormatError):
            store.gather(np.arange(len(store)))
    with pytest.raises(BankFormatError):
        convert_bank(path, tmp_path / "copy.h5")
    assert not (tmp_path / "copy.h5").exists()
    capsys.readouterr()
    for argv in (["bank", "convert", str(path), "--out", str(tmp_path / "c2.h5")],
                 ["bank", "export", str(path), "--out", str(tmp_path / "clam")],
                 ["bank", "info", str(path)]):
        assert main(argv) == 2
        assert "c.0.0" in capsys.readouterr().err


# -- a bank being written -------------------------------------------------------------------------
def test_info_on_a_bank_being_written_names_the_writer(tmp_path, info, make_bags, suffix, capsys):
    path = tmp_path / f"new{suffix}"
    bags = make_bags(3)
    with open_writer(path, info, "x") as writer:
        for b in bags[:2]:
            writer.append(b.bag_id, b.features, b.coords)
        capsys.readouterr()
        for action in ("info", "verify"):
            assert main(["bank", action, str(path)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "being written" in err[0] and f"pid {os.getpid()}" in err[0], err
            assert "2 bags committed" in err[0]
        with pytest.raises(BankFormatError, match="being written"):
            open_reader(path)
    assert len(open_reader(path)) == 2


def test_reader_after_an_interrupted_write_says_how_to_recover(tmp_path, info, make_bags, capsys):
    path = tmp_path / "new.h5"
    writer = open_writer(path, info, "x")
    for b in make_bags(2):
        writer.append(b.bag_id, b.features, b.coords)
    writer.abandon()  # as a killed writer leaves it: journal, no lock holder
    with pytest.raises(BankFormatError) as exc:
        open_reader(path)
    _refused(exc, str(path), "interrupted", "2 bags", "--recover")


def test_info_on_a_finished_bank_being_appended_to_notes_the_writer(tmp_path, info, make_bags, write_bank, capsys):
    path = write_bank(tmp_path / "bank.h5", make_bags(3), info)
    extra = make_bags(2, seed=9)
    with open_writer(path, mode="a") as writer:
        writer.append(extra[0].bag_id, extra[0].features, extra[0].coords)
        capsys.readouterr()
        assert main(["bank", "info", str(path), "--json"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["bags"] == 3  # the last finished version
        assert f"being written by pid {os.getpid()}" in captured.err and "readers see the last finished" in captured.err
    assert len(open_reader(path)) == 4
