"""The bank I/O benchmark runs end to end (tiny sizes, in-process) and writes its JSON."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_quick_benchmark_writes_table_and_json(tmp_path, capsys, load_benchmark):
    module = load_benchmark("bench_bank_io")
    assert module.main(["--quick", "--out", str(tmp_path), "--layouts", "memmap,hdf5,hdf5-mmap,zarr,clam-h5"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["layout"]: r for r in result["rows"]}
    assert set(rows) == {"memmap", "hdf5", "hdf5-mmap", "zarr", "clam-h5"}
    for row in rows.values():
        assert row["read_bags_s"] > 0 and row["pipe2_bags_s"] > 0 and row["read_ratio"] > 0
    assert rows["hdf5"]["write_s"] > 0 and rows["hdf5"]["size_mb"] > 0
    names = {t["target"] for t in result["targets"]}
    assert "hdf5 random whole-bag reads / memmap" in names and "zarr reads / CLAM per-slide h5 reads" in names
    out = capsys.readouterr().out
    assert "| hdf5 |" in out.replace("| 32 | hdf5 |", "| hdf5 |") and "Checksum cost" in out
    crc = json.loads((tmp_path / "checksums.json").read_text())
    assert {r["backend"] for r in crc["rows"]} == {"hdf5", "zarr"}
    for row in crc["rows"]:
        assert row["crc32c_ratio"] > 0 and row["crc32_ratio"] > 0 and row["read_first_ratio"] > 0
    assert [t["floor"] for t in crc["targets"]] == [0.9, 0.9]
