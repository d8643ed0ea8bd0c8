"""Extraction records the precision the encoder computed in; a bfloat16 shard (CPU autocast, standing in
for a GPU run) and a float32 shard of the same cohort are not merged silently, nor resumed into each other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import feature_cache.encoders as encoders
from feature_cache.bank import open_reader
from feature_cache.bank.errors import BankError
from feature_cache.errors import UserError
from feature_cache.extract import ExtractConfig, extract, shard_path
from feature_cache.sources.synthetic import SynthConfig, write_cohort
from milcore.cli import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("precision") / "cohort"
    write_cohort(SynthConfig(task="aml", patients=4, seed=0, bag_median=12, bag_range=(10, 16)), out)
    return out


def _bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoders computing under bfloat16 autocast (what CUDA does), here on the CPU."""
    real = encoders.create_encoder

    def create(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), dtype=torch.bfloat16)

    monkeypatch.setattr(encoders, "create_encoder", create)


def _extract(cohort: Path, out: Path, **kw) -> None:
    extract(ExtractConfig(source="crops", input=str(cohort), encoder="toy", out=str(out), num_workers=0, **kw))


def test_extraction_records_the_compute_precision(cohort: Path, tmp_path: Path, monkeypatch) -> None:
    _extract(cohort, tmp_path / "fp32.h5")
    _bf16(monkeypatch)
    _extract(cohort, tmp_path / "bf16.h5")
    with open_reader(tmp_path / "fp32.h5") as a, open_reader(tmp_path / "bf16.h5") as b:
        assert a.info.compute_dtype == "float32" and b.info.compute_dtype == "bfloat16"
        assert a.info.fingerprint() == b.info.fingerprint()
        bag = a.bag_ids()[0]
        gap = np.abs(a.read(bag).astype(np.float32) - b.read(bag).astype(np.float32)).max()
        assert gap > 1e-3, "bf16 autocast changes the stored features beyond float16 rounding"


def test_shards_of_two_precisions_are_not_merged_silently(cohort: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    _extract(cohort, tmp_path / "s.h5", shard=(0, 2))  # CPU float32
    _bf16(monkeypatch)
    _extract(cohort, tmp_path / "s.h5", shard=(1, 2))  # "GPU" bfloat16
    shards = [str(shard_path(tmp_path / "s.h5", i, 2)) for i in range(2)]
    assert main(["bank", "merge", *shards, "--out", str(tmp_path / "m.h5")]) == 2
    err = capsys.readouterr().err
    assert "computed in bfloat16" in err and "float32" in err and "--accept-mixed-precision" in err
    assert not (tmp_path / "m.h5").exists()


def test_resuming_in_another_precision_is_refused(cohort: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "bank.h5"
    _extract(cohort, out)
    with open_reader(out) as reader:
        ids = reader.bag_ids()
    _bf16(monkeypatch)
    with pytest.raises((BankError, UserError), match=r"computed in float32, these in bfloat16"):
        _extract(cohort, out)
    with open_reader(out) as reader:
        assert reader.bag_ids() == ids and reader.info.compute_dtype == "float32"
