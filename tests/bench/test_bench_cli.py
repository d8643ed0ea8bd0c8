"""``milcore bench`` in-process: bad input, skipped suites, the script suites and the tiny synthetic suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from milcore.cli import main


def _agg(bench_bank: dict, out: Path, *extra: str) -> list[str]:
    return ["bench", "aggregators", "--bank", str(bench_bank["bank"]), "--cohort", str(bench_bank["cohort"]),
            "--task", "dx", "--folds", "3", "--seeds", "0", "--epochs", "2", "--threads", "1", "--device", "cpu",
            "--out", str(out), *extra]  # fmt: skip


def test_unknown_aggregator_lists_the_registered_ones(bench_bank: dict, tmp_path: Path, capsys) -> None:
    assert main(_agg(bench_bank, tmp_path / "o", "--models", "abmil,nope")) == 2
    err = capsys.readouterr().err
    assert "unknown aggregator 'nope'" in err and "registered: " in err and "transmil" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_seeds_and_peer_names(bench_bank: dict, tmp_path: Path, capsys) -> None:
    assert main(_agg(bench_bank, tmp_path / "o", "--seeds", "a,b")) == 2
    assert main(_agg(bench_bank, tmp_path / "o", "--peers", "clam")) == 2
    assert "torchmil adapters" in capsys.readouterr().err


def test_aggregators_command_writes_json_table_and_report(bench_bank: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "agg"
    assert main(_agg(bench_bank, out, "--models", "mean,max", "--peers", "none", "--ood-site", "1")) == 0
    payload = json.loads((out / "bench.json").read_text())
    assert [s["model"] for s in payload["summary"]] == ["mean", "max"] and payload["ood_bags"] == 12
    assert (out / "table.md").read_text() in capsys.readouterr().out
    assert (out / "report.html").exists() and (out / "report.md").exists()
    assert main(_agg(bench_bank, out, "--models", "mean", "--peers", "none")) == 2, "no silent overwrite"
    assert json.loads((out / "bench.json").read_text()) == payload, "a refused run leaves the results intact"


def test_bloodmnist_suite_skips_with_the_reason_when_the_data_is_absent(tmp_path: Path, capsys) -> None:
    rc = main(["bench", "bloodmnist-bags", "--npz", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "bm")])
    assert rc == 0
    assert "skipped: BloodMNIST not found at" in capsys.readouterr().out


@pytest.mark.slow
def test_io_and_extract_suites_run_the_benchmark_scripts(tmp_path: Path) -> None:
    for suite in ("io", "extract"):
        assert main(["bench", suite, "--quick", "--out", str(tmp_path / suite)]) == 0
        assert json.loads((tmp_path / suite / "bench.json").read_text())


@pytest.mark.slow
def test_synthetic_suite_tiny(tmp_path: Path) -> None:
    import torch

    from milcore.bench.aggregators import BenchSpec
    from milcore.bench.suites import SynthCase, synthetic_suite
    from milcore.training.config import TrainConfig

    torch.set_num_threads(1)
    template = BenchSpec("", "", "", models=("abmil",), peers=(), folds=3, seeds=(0,),
                         train=TrainConfig(epochs=2, min_epochs=1, device="cpu"))  # fmt: skip
    cases = (SynthCase("aml_tiny", "aml", witness_median=0.2, bag_range=(10, 40)),)
    results = synthetic_suite(tmp_path, template, size="tiny", cases=cases, device="cpu")
    assert results["aml_tiny"]["case"]["witness_median"] == 0.2
    assert (tmp_path / "aml_tiny" / "bench.json").exists() and (tmp_path / "aml_tiny" / "bank.h5").exists()
    assert results["aml_tiny"]["instance_ground_truth"] is True


def test_training_options_reach_the_trainer() -> None:
    import argparse

    from milcore.cli.bench import _template

    args = argparse.Namespace(models=("abmil",), peers=(), folds=3, seeds=(0,), epochs=3, patience=2, lr=1e-3,
                              batch_instances=64, instance_dropout=0.5, input_norm="standardize",
                              device="cpu")  # fmt: skip
    train = _template(args).train
    assert train.instance_dropout == 0.5 and train.input_norm == "standardize" and train.epochs == 3
