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


def test_a_missing_npz_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    rc = main(["bench", "bloodmnist-bags", "--npz", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "bm")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--npz {tmp_path / 'absent.npz'}: no such file") and len(err.splitlines()) == 1
    assert not (tmp_path / "bm").exists(), "nothing is written for a refused run"


def test_the_default_bloodmnist_path_missing_is_an_error_naming_it(tmp_path: Path, capsys, monkeypatch) -> None:
    from milcore.bench import suites

    monkeypatch.setattr(suites, "BLOODMNIST_NPZ", tmp_path / "nowhere" / "bloodmnist.npz")
    assert main(["bench", "bloodmnist-bags", "--out", str(tmp_path / "bm")]) == 2
    err = capsys.readouterr().err
    assert "BloodMNIST not found at" in err and "--npz" in err and len(err.strip().splitlines()) == 1


def _fake_suites(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """Replace the four suites by instant fakes: synthetic 'all' crashes, extract exits 1, bloodmnist is absent."""
    from milcore.bench import suites

    def synthetic(out, template, size="cpu", cases=suites.SYNTHETIC_CASES, device="auto", **_):
        calls.append(("synthetic", tuple(c.name for c in cases)))
        if any(c.name == "all" for c in cases):
            raise RuntimeError("CUDA out of memory in case all")
        return {c.name: {"summary": [], "runs": [], "models": [], "seeds": []} for c in cases}

    def bloodmnist(out, template, size="cpu", npz=None, device="auto", **_):
        calls.append(("bloodmnist-bags",))
        return {"status": "skipped", "reason": "BloodMNIST not found at /x (../shared/data is absent)"}

    def script(name, out, quick, extra=None):
        calls.append((name,))
        return 1 if name == "extract" else 0

    monkeypatch.setattr(suites, "synthetic_suite", synthetic)
    monkeypatch.setattr(suites, "bloodmnist_suite", bloodmnist)
    monkeypatch.setattr(suites, "script_suite", script)
    monkeypatch.setattr("milcore.bench.report.markdown_table", lambda result: "(table)\n")


def test_bench_all_fails_when_a_suite_fails_and_says_which_and_why(tmp_path: Path, capsys, monkeypatch) -> None:
    calls: list = []
    _fake_suites(monkeypatch, calls)
    rc = main(["bench", "all", "--size", "tiny", "--device", "cpu", "--out", str(tmp_path / "all")])
    assert rc == 1
    ran = [c[0] if len(c) == 1 else c[1][0] for c in calls]
    assert ran == ["aml", "all", "anemia", "aml_witness_1pct", "aml_witness_20pct", "bloodmnist-bags", "io",
                   "extract"], "one failing case does not stop the others"  # fmt: skip
    err = capsys.readouterr().err
    assert ("2 of 8 suites failed: synthetic/all (RuntimeError: CUDA out of memory in case all); "
            "extract (exit code 1)") in err
    index = (tmp_path / "all" / "README.md").read_text()
    assert "FAILED: RuntimeError: CUDA out of memory in case all" in index and "FAILED: exit code 1" in index
    assert "skipped: BloodMNIST not found at /x" in index
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert {s["suite"]: s["status"] for s in summary["suites"]} == {
        "synthetic/aml": "ok", "synthetic/all": "failed", "synthetic/anemia": "ok", "synthetic/aml_witness_1pct": "ok",
        "synthetic/aml_witness_20pct": "ok", "bloodmnist-bags": "skipped", "io": "ok", "extract": "failed"}  # fmt: skip


def test_bench_all_returns_0_when_every_suite_ran_or_was_skipped(tmp_path: Path, monkeypatch) -> None:
    calls: list = []
    _fake_suites(monkeypatch, calls)
    from milcore.bench import suites

    monkeypatch.setattr(suites, "SYNTHETIC_CASES", tuple(c for c in suites.SYNTHETIC_CASES if c.name != "all"))
    monkeypatch.setattr(suites, "script_suite", lambda name, out, quick, extra=None: 0)
    assert main(["bench", "all", "--size", "tiny", "--device", "cpu", "--out", str(tmp_path / "all")]) == 0


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


def test_ci_installs_the_torchmil_peers() -> None:
    """CI runs the torchmil comparison code: without the `peers` extra its tests would all skip silently."""
    import importlib.util
    import os

    if os.environ.get("CI") != "true":
        pytest.skip("outside CI the peers extra (torchmil) is optional")
    assert importlib.util.find_spec("torchmil") is not None, (
        "CI must install the peers extra (.ci/run: make test EXTRAS=dev,peers) so milcore/bench/peers.py is tested"
    )
