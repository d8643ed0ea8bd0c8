"""The compute precision of a bank's features (issue 14): recorded, checked on append and merge, and
'unrecorded' for banks written before it was recorded."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import pytest

from feature_cache.bank import EncoderInfo, open_reader, open_writer
from feature_cache.bank.errors import BankError
from feature_cache.bank.merge import merge_banks
from milcore.cli import main


def test_a_fingerprint_without_a_precision_reads_as_unrecorded(info: EncoderInfo) -> None:
    assert info.compute_dtype == "unrecorded"
    old = {k: v for k, v in info.to_dict().items() if k != "compute_dtype"}  # as banks before 1.3 stored it
    assert EncoderInfo.from_dict(old).compute_dtype == "unrecorded"
    bf16 = replace(info, compute_dtype="bfloat16")
    assert bf16.fingerprint() == info.fingerprint(), "precision is recorded beside the fingerprint, not in it"
    assert EncoderInfo.from_dict(json.dumps(bf16.to_dict())).compute_dtype == "bfloat16"
    with pytest.raises(BankError, match="compute_dtype"):
        replace(info, compute_dtype="int8")


def test_an_old_bank_reads_as_unrecorded(tmp_path: Path, info: EncoderInfo, make_bags, write_bank) -> None:
    path = write_bank(tmp_path / "old.h5", make_bags(3), replace(info, compute_dtype="float32"))
    with h5py.File(path, "r+") as f:  # strip the field, as a bank written before it existed
        key = next(k for k, v in f.attrs.items() if isinstance(v, str) and '"compute_dtype"' in v)
        stored = json.loads(f.attrs[key])
        del stored["compute_dtype"]
        f.attrs[key] = json.dumps(stored)
    with open_reader(path) as reader:
        assert reader.info.compute_dtype == "unrecorded"
        assert reader.describe()["compute_dtype"] == "unrecorded"


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_merge_refuses_shards_of_different_precision(
    tmp_path: Path, info: EncoderInfo, suffix: str, make_bags, write_bank
) -> None:
    """Before: a GPU-bf16 shard and a CPU-fp32 shard merged silently into one bank."""
    a = write_bank(tmp_path / f"gpu{suffix}", make_bags(3, seed=1), replace(info, compute_dtype="bfloat16"))
    b = write_bank(tmp_path / f"cpu{suffix}", make_bags(3, seed=2), replace(info, compute_dtype="float32"))
    with pytest.raises(BankError, match=r"computed in float32.*bfloat16.*accept_mixed_precision"):
        merge_banks([a, b], tmp_path / f"m{suffix}")
    assert not (tmp_path / f"m{suffix}").exists()
    summary = merge_banks([a, b], tmp_path / f"m{suffix}", accept_mixed_precision=True)
    assert summary["compute_dtype"] == "mixed:bfloat16+float32"
    with open_reader(tmp_path / f"m{suffix}") as reader:
        assert reader.info.compute_dtype == "mixed:bfloat16+float32" and len(reader) == 6


def test_merge_of_one_precision_keeps_it_and_unrecorded_counts_as_a_difference(
    tmp_path: Path, info: EncoderInfo, make_bags, write_bank
) -> None:
    a = write_bank(tmp_path / "a.h5", make_bags(2, seed=1), replace(info, compute_dtype="float32"))
    b = write_bank(tmp_path / "b.h5", make_bags(2, seed=2), replace(info, compute_dtype="float32"))
    assert merge_banks([a, b], tmp_path / "m.h5")["compute_dtype"] == "float32"
    old = write_bank(tmp_path / "old.h5", make_bags(2, seed=3), info)  # unrecorded
    with pytest.raises(BankError, match="unrecorded"):
        merge_banks([a, old], tmp_path / "m2.h5")


def test_appending_another_precision_to_a_recorded_bank_is_refused(
    tmp_path: Path, info: EncoderInfo, make_bags, write_bank
) -> None:
    path = write_bank(tmp_path / "b.h5", make_bags(2, seed=1), replace(info, compute_dtype="bfloat16"))
    with pytest.raises(BankError, match=r"bfloat16.*float32"):
        open_writer(path, replace(info, compute_dtype="float32"), "a")
    with open_writer(path, replace(info, compute_dtype="bfloat16"), "a") as writer:  # same precision: resumes
        bag = make_bags(1, seed=9)[0]
        writer.append("extra", bag.features)
    old = write_bank(tmp_path / "old.h5", make_bags(2, seed=2), info)  # an unrecorded bank stays unrecorded
    with open_writer(old, replace(info, compute_dtype="float32"), "a") as writer:
        writer.append("extra", make_bags(1, seed=9)[0].features)
    with open_reader(old) as reader:
        assert reader.info.compute_dtype == "unrecorded" and len(reader) == 3


def test_bank_merge_cli_says_so_in_one_line(tmp_path: Path, info: EncoderInfo, capsys, make_bags, write_bank) -> None:
    a = write_bank(tmp_path / "gpu.h5", make_bags(2, seed=1), replace(info, compute_dtype="bfloat16"))
    b = write_bank(tmp_path / "cpu.h5", make_bags(2, seed=2), replace(info, compute_dtype="float32"))
    out = tmp_path / "m.h5"
    assert main(["bank", "merge", str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--accept-mixed-precision" in err and str(b) in err
    assert main(["bank", "merge", str(a), str(b), "--out", str(out), "--accept-mixed-precision"]) == 0
    assert "mixed precision" in capsys.readouterr().err
    assert main(["bank", "info", str(out)]) == 0
    assert "compute precision: mixed:bfloat16+float32" in capsys.readouterr().err


def _with_precision(src: Path, out: Path, precision: str) -> Path:
    from feature_cache.bank.merge import copy_bags

    with open_reader(src) as reader, open_writer(out, replace(reader.info, compute_dtype=precision), "x") as w:
        copy_bags(reader, w)
    return out


def test_a_model_applied_to_another_precision_gets_a_warning(planted_factory, tmp_path: Path, capsys) -> None:
    """Warned, not refused: the features differ by about bfloat16's rounding (measured in
    benchmarks/bench_precision.py), a model still applies, but the user should know."""
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    planted = planted_factory(tmp_path / "p", n_bags=12, sizes=(10, 20))
    fp32 = _with_precision(planted["bank"], tmp_path / "fp32.h5", "float32")
    bf16 = _with_precision(planted["bank"], tmp_path / "bf16.h5", "bfloat16")
    spec = RunSpec(str(fp32), str(planted["cohort"]), "dx", folds=3, n_boot=20)
    train_run(spec, TrainConfig(model="mean", epochs=1, patience=1, min_epochs=1, device="cpu"), tmp_path / "run")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--bank", str(fp32), "--out",
                 str(tmp_path / "same")]) == 0  # fmt: skip
    assert "precision" not in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--bank", str(bf16), "--out",
                 str(tmp_path / "other")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"{bf16}: features computed in bfloat16, not float32 as those the model" in err
