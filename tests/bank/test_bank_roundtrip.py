"""Round trips through both backends: dtypes, compression, empty bags, metadata, io modes, append."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest
import zarr

from feature_cache.bank import FORMAT, FORMAT_VERSION, EncoderInfo, open_reader, open_writer
from feature_cache.bank.errors import BankError, EncoderMismatchError

try:
    import hdf5plugin  # noqa: F401

    HAVE_PLUGIN = True
except ImportError:
    HAVE_PLUGIN = False


def _check(reader, bags, dtype):
    assert reader.bag_ids() == [b.bag_id for b in bags]
    assert len(reader) == len(bags)
    assert reader.num_instances == sum(len(b.features) for b in bags)
    assert reader.dtype == np.dtype(dtype)
    offsets = reader.offsets()
    assert offsets.dtype == np.int64 and offsets[0] == 0 and len(offsets) == len(bags) + 1
    for i, b in enumerate(bags):
        x = reader.read(b.bag_id)
        assert x.shape == (len(b.features), reader.dim) and x.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(x, b.features.astype(dtype))
        np.testing.assert_array_equal(reader.read_coords(b.bag_id), b.coords)
        np.testing.assert_array_equal(reader.read_column(b.bag_id, "cell_id"), b.cell_id)
        assert list(reader.read_column(b.bag_id, "cell_type")) == b.cell_type
        assert offsets[i + 1] - offsets[i] == len(b.features)
    meta = reader.bag_meta
    assert list(meta["site"]) == [b.meta["site"] for b in bags]
    assert meta["n_detected"].dtype == np.int64 and list(meta["n_detected"]) == [b.meta["n_detected"] for b in bags]
    np.testing.assert_allclose(meta["score"], [b.meta["score"] for b in bags])
    assert list(meta["ok"]) == [b.meta["ok"] for b in bags]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_roundtrip_both_backends(tmp_path, info, suffix, dtype, make_bags, write_bank):
    bags = make_bags(12)
    path = write_bank(tmp_path / f"bank{suffix}", bags, info, dtype=dtype)
    with open_reader(path) as reader:
        assert reader.info == info
        _check(reader, bags, dtype)
        assert reader.read(bags[3].bag_id).shape == (0, 16)  # the empty bag
        ids = [bags[5].bag_id, bags[3].bag_id, bags[0].bag_id]
        x, ptr = reader.read_packed(ids)
        np.testing.assert_array_equal(x, np.concatenate([reader.read(i) for i in ids]))
        assert ptr.tolist() == [0, *np.cumsum([len(reader.read(i)) for i in ids]).tolist()]
        c, cptr = reader.read_packed_coords(ids)
        assert np.array_equal(cptr, ptr) and c.shape == (len(x), 2)
        assert [len(a) for a in reader.read_many(ids)] == np.diff(ptr).tolist()


@pytest.mark.parametrize(
    ("suffix", "compression"),
    [(".h5", "lzf"), (".h5", "gzip"), (".h5", "blosc-zstd"), (".zarr", "gzip"), (".zarr", "blosc-zstd")],
)
def test_roundtrip_compressed(tmp_path, info, suffix, compression, make_bags, write_bank):
    if suffix == ".h5" and compression == "blosc-zstd" and not HAVE_PLUGIN:
        pytest.skip("hdf5plugin is not installed")
    bags = make_bags(10, seed=1)
    path = write_bank(tmp_path / f"bank{suffix}", bags, info, compression=compression, chunk_rows=32)
    with open_reader(path) as reader:
        _check(reader, bags, "float16")
        assert reader.describe()["features"]["compression"]


def test_io_modes_agree(tmp_path, info, suffix, make_bags, write_bank):
    bags = make_bags(8, seed=2)
    path = write_bank(tmp_path / f"bank{suffix}", bags, info)
    modes = ["auto", "pread", "mmap", "library"]
    results = []
    for io in modes:
        with open_reader(path, io=io) as reader:
            results.append(reader.read_packed(reader.bag_ids())[0])
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def test_fast_layout_is_used(tmp_path, info, suffix, make_bags, write_bank):
    path = write_bank(tmp_path / f"bank{suffix}", make_bags(6), info)
    with open_reader(path) as reader:
        layout = reader.describe()["features"]["reader"]
    assert layout.startswith("contiguous (pread)" if suffix == ".h5" else "zarr chunks")


def test_plain_libraries_read_the_store(tmp_path, info, make_bags, write_bank):
    bags = make_bags(7, seed=3)
    h5 = write_bank(tmp_path / "bank.h5", bags, info)
    zr = write_bank(tmp_path / "bank.zarr", bags, info)
    expected = np.concatenate([b.features for b in bags]).astype(np.float16)
    with h5py.File(h5, "r") as f:
        assert f.attrs["format"] == FORMAT and f.attrs["format_version"] == FORMAT_VERSION
        assert f["instances/features"].chunks is None  # contiguous
        np.testing.assert_array_equal(f["instances/features"][()], expected)
        assert EncoderInfo.from_dict(f.attrs["encoder"]) == info
        for key in ("created", "generated_by"):
            assert f.attrs[key]
    group = zarr.open_group(zr, mode="r")
    np.testing.assert_array_equal(group["instances/features"][:], expected)
    assert list(group["bags/bag_id"][:]) == [b.bag_id for b in bags]
    assert json.loads(group.attrs["encoder"])["fingerprint"] == info.fingerprint()
    np.testing.assert_array_equal(group["indexes/bag_offset"][:], np.cumsum([0] + [len(b.features) for b in bags]))


def test_append_mode_resumes_and_extends(tmp_path, info, suffix, make_bags, write_bank):
    bags = make_bags(9, seed=4)
    path = write_bank(tmp_path / f"bank{suffix}", bags[:5], info)
    with open_writer(path, mode="a") as writer:  # info comes from the bank
        assert writer.has(bags[0].bag_id) and not writer.has(bags[5].bag_id)
        for b in bags[5:]:
            writer.append(b.bag_id, b.features, b.coords, cell_id=b.cell_id, cell_type=b.cell_type, meta=b.meta)
    with open_reader(path) as reader:
        _check(reader, bags, "float16")


def test_append_without_new_bags_does_not_rewrite(tmp_path, info, make_bags, write_bank):
    path = write_bank(tmp_path / "bank.h5", make_bags(4), info)
    before = path.stat().st_mtime_ns, path.stat().st_ino
    with open_writer(path, info, mode="a") as writer:
        assert len(writer) == 4
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before


def test_append_keeps_settings_and_rejects_changes(tmp_path, info, make_bags, write_bank):
    path = write_bank(tmp_path / "bank.h5", make_bags(3), info, dtype="float32")
    with pytest.raises(BankError, match="dtype"):
        open_writer(path, info, mode="a", dtype="float16")
    other = EncoderInfo("toy", "2.0", "", "resize=64", 16)
    with pytest.raises(EncoderMismatchError, match="version"):
        open_writer(path, other, mode="a")
    with open_writer(path, mode="a") as writer:
        writer.append("extra", np.ones((2, 16)))
    with open_reader(path) as reader:
        assert reader.dtype == np.float32 and len(reader) == 4


def test_mode_w_replaces_and_x_refuses(tmp_path, info, suffix, make_bags, write_bank):
    path = write_bank(tmp_path / f"bank{suffix}", make_bags(4), info)
    with pytest.raises(BankError, match="already exists"):
        open_writer(path, info, mode="x")
    write_bank(path, make_bags(2, seed=9), info, mode="w")
    with open_reader(path) as reader:
        assert len(reader) == 2 and reader.bag_ids()[0].startswith("patient_9")


def test_reader_pickles_small_and_reads_after_unpickling(tmp_path, info, suffix, make_bags, write_bank):
    bags = make_bags(20, seed=5)
    path = write_bank(tmp_path / f"bank{suffix}", bags, info)
    reader = open_reader(path)
    reader.read(bags[0].bag_id)  # opens handles; they must not be pickled
    blob = pickle.dumps(reader)
    assert len(blob) < reader.num_instances * reader.dim * 2 / 4
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.read(bags[7].bag_id), bags[7].features.astype(np.float16))
    reader.close()
    clone.close()


def test_encoder_info_fingerprint_is_stable():
    info = EncoderInfo("toy", "1.0", "", {"size": 64, "norm": "imagenet"}, 8, dtype="float16")
    assert info.transform == '{"norm":"imagenet","size":64}'
    # a literal: the fingerprint must not change between versions or machines
    assert info.fingerprint() == "2e4b4e394c6ee9ab0b9063208d2d3c805654ff2d958db71f0fd4fb2f4f1bf818"
    same = EncoderInfo.from_dict(info.to_dict())
    assert same == info and same.fingerprint() == info.fingerprint()
    assert EncoderInfo("toy", "1.0", "", info.transform, 8, dtype="float32").fingerprint() == info.fingerprint()
    assert EncoderInfo("toy", "1.1", "", info.transform, 8).fingerprint() != info.fingerprint()
    tampered = {**info.to_dict(), "dim": 9}
    with pytest.raises(BankError, match="does not match"):
        EncoderInfo.from_dict(tampered)
    with pytest.raises(BankError, match="dim"):
        EncoderInfo("toy", "1", "", "t", 0)
    with pytest.raises(EncoderMismatchError, match="version"):
        info.check_compatible(EncoderInfo("toy", "2", "", info.transform, 8), where="model.ckpt")


def test_metadata_kinds_and_unknown_cell_types(tmp_path, info, suffix):
    path = tmp_path / f"bank{suffix}"
    with open_writer(path, info) as writer:
        writer.append("a", np.zeros((2, 16)), meta={"score": 1, "tag": "x"}, cell_type=["blast", ""])
        writer.append("b", np.zeros((1, 16)), meta={"score": 0.5})  # int column becomes float
        writer.append("c", np.zeros((1, 16)), meta={"flag": True})
    with open_reader(path) as reader:
        meta = reader.bag_meta
        assert meta["score"].dtype == np.float64 and meta["score"][:2].tolist() == [1.0, 0.5]
        assert np.isnan(meta["score"][2])
        assert meta["tag"].tolist() == ["x", "", ""] and meta["flag"].tolist() == [False, False, True]
        assert reader.read_column("a", "cell_type").tolist() == ["blast", ""]
        assert reader.read_column("b", "cell_type").tolist() == [""]
    with open_writer(path, mode="a") as writer:  # kinds and codes survive an append session
        writer.append("d", np.zeros((1, 16)), meta={"score": 2}, cell_type=["myelocyte"])
    with open_reader(path) as reader:
        assert reader.bag_meta["score"].tolist()[-1] == 2.0
        assert reader.read_column("a", "cell_type").tolist() == ["blast", ""]
        assert reader.read_column("d", "cell_type").tolist() == ["myelocyte"]


def test_empty_bank(tmp_path, info, suffix):
    path = tmp_path / f"bank{suffix}"
    with open_writer(path, info):
        pass
    with open_reader(path) as reader:
        assert len(reader) == 0 and reader.num_instances == 0 and reader.offsets().tolist() == [0]
        x, ptr = reader.read_packed([])
        assert x.shape == (0, 16) and ptr.tolist() == [0]


def test_cell_ids_accept_integers_and_reject_long_or_float_ids(tmp_path, info) -> None:
    from feature_cache.bank import BankError, open_reader, open_writer

    x = np.zeros((3, info.dim), np.float32)
    with open_writer(tmp_path / "ids.h5", info, "x") as writer:
        writer.append("a", x, cell_id=np.array([7, 8, 9]))
        with pytest.raises(BankError, match="longer than 48 bytes"):
            writer.append("b", x, cell_id=["x" * 49, "y", "z"])
        with pytest.raises(BankError, match="not floats"):
            writer.append("c", x, cell_id=[1.5, 2.0, 3.0])
    assert list(open_reader(tmp_path / "ids.h5").read_column("a", "cell_id")) == ["7", "8", "9"]
