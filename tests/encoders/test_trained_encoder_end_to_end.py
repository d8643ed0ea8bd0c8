"""End to end: a trained encoder extracts like any other, and a MIL model trained on its bank is refused on
the bank of another trained encoder (same architecture, other weights) -- the weights hash is in the fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from feature_cache.encoders.train_supervised import SupervisedConfig, train_supervised
from milcore.cli import main
from tests.encoders.cellsets import write_class_tree, write_patients

TINY = {"image_size": 16, "width": 4, "batch_size": 8, "device": "cpu", "threads": 1, "epochs": 1}


def test_model_trained_on_one_encoders_bank_is_refused_on_anothers(tmp_path: Path, capsys) -> None:
    from feature_cache.bank import open_reader

    cells = write_class_tree(tmp_path / "cells", n_per_class=8, size=20)
    a = train_supervised(SupervisedConfig(data=str(cells), out=str(tmp_path / "enc_a"), seed=0, **TINY))
    b = train_supervised(SupervisedConfig(data=str(cells), out=str(tmp_path / "enc_b"), seed=1, **TINY))
    cohort = write_patients(tmp_path / "cohort", n=12, cells=6)
    banks = {}
    for name, result in (("a", a), ("b", b)):
        banks[name] = tmp_path / f"{name}.h5"
        rc = main(["extract", "--source", "crops", "--input", str(cohort / "crops"), "--encoder", "compact_cnn",
                   "--weights", str(result.weights), "--out", str(banks[name]), "--device", "cpu", "--workers", "0",
                   "-q"])  # fmt: skip
        assert rc == 0
    with open_reader(banks["a"]) as r:
        assert r.info.weights_sha256 == a.card["weights_sha256"] and r.info.dim == 32
        assert r.info.transform.startswith("resize_shorter=16")
    run = tmp_path / "run"
    rc = main(["train", "--bank", str(banks["a"]), "--cohort", str(cohort / "cohort.csv"), "--task", "dx",
               "--model", "mean", "--folds", "3", "--epochs", "2", "--out", str(run), "-q"])  # fmt: skip
    assert rc == 0
    assert main(["predict", "--checkpoint", str(run), "--bank", str(banks["a"]), "--out", str(tmp_path / "pa"),
                 "-q"]) == 0  # fmt: skip
    capsys.readouterr()
    rc = main(["predict", "--checkpoint", str(run), "--bank", str(banks["b"]), "--out", str(tmp_path / "pb")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "encoder mismatch" in err[0] and "weights_sha256" in err[0]
    assert not (tmp_path / "pb").exists()


@pytest.mark.parametrize("field", ["image_size"])
def test_recorded_options_can_be_overridden(tmp_path: Path, field: str) -> None:
    from feature_cache.encoders import create_encoder

    cells = write_class_tree(tmp_path / "cells", n_per_class=4, size=20)
    result = train_supervised(SupervisedConfig(data=str(cells), out=str(tmp_path / "e"), **TINY))
    enc = create_encoder("compact_cnn", weights=result.weights, device="cpu", **{field: 24})
    assert enc.input_size == 24 and "resize_shorter=24" in enc.info.transform
