"""``milcore bank ...`` in-process: every action, JSON output, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np

from feature_cache.bank import open_reader, open_writer
from milcore.cli import main


def test_info_and_verify(tmp_path, info, capsys, make_bags, write_bank):
    path = write_bank(tmp_path / "bank.h5", make_bags(5), info, checksum=True)
    capsys.readouterr()
    assert main(["bank", "info", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bags"] == 5 and out["dim"] == 16 and out["encoder"]["name"] == "toy"
    assert out["features"]["reader"] == "contiguous (pread)" and out["bag_size"]["empty"] == 1
    assert main(["bank", "verify", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["checksums_checked"] == 5


def test_verify_failure_is_one_line_exit_2(tmp_path, info, capsys, make_bags, write_bank):
    path = write_bank(tmp_path / "bank.h5", make_bags(4), info, checksum=True)
    with h5py.File(path, "r+") as f:
        f["instances/features"][0, 0] = np.inf
    capsys.readouterr()
    assert main(["bank", "verify", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("milcore bank: error: ") and "NaN/Inf feature values in 1 bags" in err[-1]


def test_bad_input_exit_2(tmp_path, capsys):
    for argv in (["bank", "info", str(tmp_path / "missing.zarr")], ["bank", "verify", "notes.txt"], ["bank"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("milcore bank")


def test_merge_convert_import_export(tmp_path, info, capsys, make_bags, write_bank):
    a = write_bank(tmp_path / "r0.h5", make_bags(3, seed=0), info)
    b = write_bank(tmp_path / "r1.h5", make_bags(3, seed=1), info)
    merged, zarr_copy, clam, back = (tmp_path / n for n in ("m.h5", "m.zarr", "clam", "back.h5"))
    assert main(["bank", "merge", str(a), str(b), "--out", str(merged)]) == 0
    assert main(["bank", "merge", str(a), str(b), "--out", str(merged)]) == 2  # exists
    assert main(["bank", "merge", str(a), str(b), "--out", str(merged), "--overwrite"]) == 0
    assert main(["bank", "convert", str(merged), "--out", str(zarr_copy), "--compression", "blosc-zstd"]) == 0
    assert main(["bank", "export", str(zarr_copy), "--out", str(clam)]) == 0
    capsys.readouterr()
    assert main(["bank", "import", str(clam), "--out", str(back), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bags"] == 6
    with open_reader(merged) as m, open_reader(back) as r:
        assert sorted(m.bag_ids()) == r.bag_ids()
        for bag_id in m.bag_ids():
            np.testing.assert_array_equal(m.read(bag_id), r.read(bag_id))


def test_verify_recover_finishes_an_interrupted_write(tmp_path, info, capsys, make_bags):
    path = tmp_path / "bank.zarr"
    bags = make_bags(4)
    writer = open_writer(path, info)
    for bag in bags:
        writer.append(bag.bag_id, bag.features)
    writer.abandon()  # as if the process died: journal kept, no bank yet
    assert main(["bank", "verify", str(path)]) == 2
    assert main(["bank", "verify", str(path), "--recover"]) == 0
    with open_reader(path) as reader:
        assert reader.bag_ids() == [b.bag_id for b in bags]


def test_cli_import_stays_light():
    code = "import sys, milcore.cli; milcore.cli.build_parser(); print(sorted({'h5py', 'zarr'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
