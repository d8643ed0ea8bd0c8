"""merge, convert, and CLAM/TRIDENT import/export, on files laid out as those tools write them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from feature_cache.bank import BankError, EncoderInfo, EncoderMismatchError, open_reader
from feature_cache.bank.clam import export_clam, import_clam
from feature_cache.bank.convert import convert_bank
from feature_cache.bank.merge import merge_banks
from feature_cache.bank.verify import verify_bank


def _same_bags(a, b):
    assert a.bag_ids() == b.bag_ids()
    assert a.info == b.info
    for bag_id in a.bag_ids():
        np.testing.assert_array_equal(a.read(bag_id).astype(np.float32), b.read(bag_id).astype(np.float32))
        np.testing.assert_array_equal(a.read_coords(bag_id), b.read_coords(bag_id))
    for name, values in a.bag_meta.items():
        np.testing.assert_array_equal(values, b.bag_meta[name])


def clam_save_hdf5(path, features, coords, attrs=None, coords_attrs=None):
    """What CLAM's ``save_hdf5`` writes: one-row chunks, unlimited first axis, float32, int64 coords."""
    with h5py.File(path, "w") as f:
        for key, value in (("features", features), ("coords", coords)):
            ds = f.create_dataset(key, shape=value.shape, maxshape=(None, *value.shape[1:]),
                                  chunks=(1, *value.shape[1:]), dtype=value.dtype)
            ds[:] = value
        for k, v in (coords_attrs or {}).items():
            f["coords"].attrs[k] = v
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


def test_merge_shards_from_both_backends(tmp_path, info, make_bags, write_bank):
    a = write_bank(tmp_path / "rank0.h5", make_bags(5, seed=0), info)
    b = write_bank(tmp_path / "rank1.zarr", make_bags(4, seed=1), info)
    out = tmp_path / "merged.h5"
    summary = merge_banks([a, b], out)
    assert summary["bags"] == 9 and summary["skipped"] == 0
    with open_reader(out) as merged, open_reader(a) as ra, open_reader(b) as rb:
        assert merged.bag_ids() == ra.bag_ids() + rb.bag_ids()
        for reader in (ra, rb):
            for bag_id in reader.bag_ids():
                np.testing.assert_array_equal(merged.read(bag_id), reader.read(bag_id))
                assert list(merged.read_column(bag_id, "cell_type")) == list(reader.read_column(bag_id, "cell_type"))
        assert merged.bag_meta["site"].tolist() == ra.bag_meta["site"].tolist() + rb.bag_meta["site"].tolist()
    assert verify_bank(out).ok


def test_merge_refuses_duplicates_mismatches_and_existing_output(tmp_path, info, make_bags, write_bank):
    a = write_bank(tmp_path / "a.h5", make_bags(3, seed=0), info)
    dup = write_bank(tmp_path / "dup.zarr", make_bags(2, seed=0), info)
    with pytest.raises(BankError, match="duplicate bag id 'patient_0_000'"):
        merge_banks([a, dup], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists() and not (tmp_path / "m.h5.journal").exists()
    assert merge_banks([a, dup], tmp_path / "m.h5", skip_duplicates=True)["skipped"] == 2
    with pytest.raises(BankError, match="already exists"):
        merge_banks([a], tmp_path / "m.h5")
    other = write_bank(tmp_path / "o.h5", make_bags(2, seed=5), EncoderInfo("other", "1", "", "x", 16))
    with pytest.raises(EncoderMismatchError, match="name"):
        merge_banks([a, other], tmp_path / "m2.h5")


def test_convert_roundtrip_and_dtype(tmp_path, info, make_bags, write_bank):
    src = write_bank(tmp_path / "src.h5", make_bags(6, seed=2), info, dtype="float32", checksum=True)
    z = tmp_path / "copy.zarr"
    assert convert_bank(src, z, compression="blosc-zstd")["bags"] == 6
    back = tmp_path / "back.h5"
    convert_bank(z, back)
    with open_reader(src) as a, open_reader(z) as b, open_reader(back) as c:
        assert b.dtype == np.float32 and c.dtype == np.float32
        assert b.checksums is not None and np.array_equal(a.checksums, c.checksums)  # kept by default
        _same_bags(a, b)
        _same_bags(a, c)
    half = tmp_path / "half.h5"
    convert_bank(src, half, dtype="float16")
    with open_reader(half) as h:
        assert h.dtype == np.float16
    assert verify_bank(half).checksums_checked == 6  # recomputed for the float16 bytes
    convert_bank(src, tmp_path / "plain.h5", checksum=False)
    assert verify_bank(tmp_path / "plain.h5").checksums_checked == 0


def test_import_clam_and_trident_folders(tmp_path):
    rng = np.random.default_rng(0)
    clam = tmp_path / "clam_feats" / "h5_files"
    clam.mkdir(parents=True)
    expected = {}
    for i, n in enumerate([5, 0, 9]):
        x = rng.standard_normal((n, 32)).astype(np.float32)
        coords = rng.integers(0, 50_000, (n, 2)).astype(np.int64)
        if n:
            clam_save_hdf5(clam / f"slide_{i}.h5", x, coords, coords_attrs={"patch_level": 0, "patch_size": 256})
        else:  # an empty slide, as TRIDENT leaves them
            with h5py.File(clam / f"slide_{i}.h5", "w") as f:
                f.create_dataset("features", shape=(0, 32), dtype=np.float32)
                f.create_dataset("coords", shape=(0, 2), dtype=np.int64)
        expected[f"slide_{i}"] = (x, coords)
    bank = tmp_path / "imported.h5"
    summary = import_clam(tmp_path / "clam_feats", bank, dtype="float32", encoder="uni_v1")
    assert summary == {**summary, "bags": 3, "empty_bags": 1, "dim": 32, "instances": 14}
    with open_reader(bank) as reader:
        assert reader.info.name == "uni_v1"
        for bag_id, (x, coords) in expected.items():
            np.testing.assert_array_equal(reader.read(bag_id), x)
            np.testing.assert_array_equal(reader.read_coords(bag_id), coords)
        assert reader.bag_meta["coords.patch_size"].tolist() == [256, -1, 256]

    trident = tmp_path / "20x_256px_0px_overlap" / "features_conch_v15"
    trident.mkdir(parents=True)
    for i in range(2):
        x, coords = rng.standard_normal((4, 8)).astype(np.float32), rng.integers(0, 999, (4, 2))
        clam_save_hdf5(trident / f"TCGA-{i}.h5", x, coords, attrs={"name": f"TCGA-{i}"},
                       coords_attrs={"level0_magnification": 40, "target_magnification": 20.0})
    zbank = tmp_path / "trident.zarr"
    import_clam(trident, zbank)
    with open_reader(zbank) as reader:
        assert reader.info.name == "conch_v15" and reader.dim == 8 and reader.dtype == np.float16
        assert reader.bag_meta["coords.level0_magnification"].tolist() == [40, 40]
        assert reader.bag_meta["name"].tolist() == ["TCGA-0", "TCGA-1"]


def test_import_errors(tmp_path):
    folder = tmp_path / "feats"
    folder.mkdir()
    with pytest.raises(BankError, match=r"no \.h5 files"):
        import_clam(folder, tmp_path / "x.h5")
    with h5py.File(folder / "a.h5", "w") as f:
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(BankError, match=r"a\.h5: has no 'features' dataset"):
        import_clam(folder, tmp_path / "x.h5")
    (folder / "a.h5").unlink()
    clam_save_hdf5(folder / "a.h5", np.zeros((2, 8), np.float32), np.zeros((2, 2), np.int64))
    clam_save_hdf5(folder / "b.h5", np.zeros((2, 6), np.float32), np.zeros((2, 2), np.int64))
    with pytest.raises(BankError, match=r"b\.h5: 6-d features, but the bank is 8-d"):
        import_clam(folder, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.journal").exists()


def test_export_then_import_is_lossless(tmp_path, info, make_bags, write_bank):
    bank = write_bank(tmp_path / "bank.zarr", make_bags(5, seed=3), info)
    out = tmp_path / "clam"
    assert export_clam(bank, out, pt=True)["files"] == 5
    with open_reader(bank) as reader:
        first = reader.bag_ids()[0]
        with h5py.File(out / "h5_files" / f"{first}.h5", "r") as f:
            assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
            np.testing.assert_array_equal(f["features"][()], reader.read(first).astype(np.float32))
        import torch

        assert torch.load(out / "pt_files" / f"{first}.pt").shape == reader.read(first).shape
    again = tmp_path / "again.h5"
    import_clam(out, again)
    with open_reader(bank) as a, open_reader(again) as b:
        assert sorted(a.bag_ids()) == b.bag_ids()
        assert a.info == b.info  # the fingerprint travels in the files
        for bag_id in a.bag_ids():
            np.testing.assert_array_equal(a.read(bag_id), b.read(bag_id))
            np.testing.assert_array_equal(a.read_coords(bag_id), b.read_coords(bag_id))
    with pytest.raises(BankError, match="already exists"):
        export_clam(bank, out)
