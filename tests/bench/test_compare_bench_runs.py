"""benchmarks/compare_bench_runs.py pairs two bench runs fit by fit and refuses what it cannot pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def script(load_benchmark):
    return load_benchmark("compare_bench_runs")


def _run(model: str, seed: int, fold: int, ba: float, auroc: float, **extra) -> dict:
    return {"model": model, "impl": "milcore", "variant": "default", "seed": seed, "fold": fold, "status": "ok",
            "balanced_accuracy": ba, "auroc": auroc, "epochs_run": 10, "cpu_s": 1.0, **extra}  # fmt: skip


def test_pairs_fit_by_fit_with_bootstrap_cis(script, tmp_path: Path) -> None:
    a = {"runs": [_run("abmil", s, f, 0.5, 0.7) for s in range(2) for f in range(3)]
         + [_run("mean", 0, 0, 0.4, 0.6), _run("mean", 0, 1, 0.4, float("nan"))]}  # fmt: skip
    b = {"runs": [_run("abmil", s, f, 0.5 + 0.1 * f, 0.7) for s in range(2) for f in range(3)]
         + [_run("mean", 0, 0, 0.4, 0.6), _run("mean", 0, 1, 0.45, 0.9), _run("mean", 0, 2, 0.9, 0.9),
            _run("abmil", 5, 0, 0.0, 0.0, status="failed")]}  # fmt: skip
    paths = []
    for name, data in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    assert script.main([str(paths[0]), str(paths[1]), "--names", "old,new", "--metrics",
                        "balanced_accuracy,auroc", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["paired_fits"] == 8 and result["only_in_b"] == 1  # the unfinished fit is not paired
    abmil = next(r for r in result["models"] if r["model"] == "abmil")
    diff = abmil["balanced_accuracy"]["diff"]
    assert diff["mean"] == pytest.approx(0.1) and diff["low"] <= 0.1 <= diff["high"] and diff["high"] <= 0.2 + 1e-9
    assert abmil["balanced_accuracy"]["identical"] == 2 and abmil["auroc"]["identical"] == 6
    mean = next(r for r in result["models"] if r["model"] == "mean")
    assert mean["auroc"]["diff"]["n"] == 1, "a NaN on either side is left out of that metric's pairs"
    assert result["overall"]["balanced_accuracy"]["n"] == 8
    assert "new − old" in (tmp_path / "out" / "compare.md").read_text()


def test_runs_that_share_no_fit_are_refused(script, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"runs": [_run("abmil", 0, 0, 0.5, 0.5)]}))
    (tmp_path / "b.json").write_text(json.dumps({"runs": [_run("mean", 0, 0, 0.5, 0.5)]}))
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(SystemExit) as err:
        script.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "share no finished fit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        script.main([str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "c.json: not a readable bench.json" in capsys.readouterr().err
    (tmp_path / "d.json").write_text(json.dumps({"runs": [_run("abmil", 0, 0, 0.5, 0.5)],
                                                 "splits": {"0": [{"index": 0, "test": ["p1"]}]}}))  # fmt: skip
    (tmp_path / "e.json").write_text(json.dumps({"runs": [_run("abmil", 0, 0, 0.6, 0.5)],
                                                 "splits": {"0": [{"index": 0, "test": ["p2"]}]}}))  # fmt: skip
    with pytest.raises(SystemExit) as err:  # fold 0 of one run is not fold 0 of the other
        script.main([str(tmp_path / "d.json"), str(tmp_path / "e.json"), "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "split the patients differently (seed 0)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "nothing written for refused inputs"


def test_variants_keep_only_those_fits(script, tmp_path: Path) -> None:
    a = {"runs": [_run("abmil", 0, f, 0.5, 0.7) for f in range(2)]
         + [_run("abmil", 0, f, 0.5, 0.7, variant="tuned") for f in range(2)]}  # fmt: skip
    b = {"runs": [_run("abmil", 0, f, 0.5, 0.7) for f in range(2)]
         + [_run("abmil", 0, f, 0.6, 0.7, variant="tuned") for f in range(2)]}  # fmt: skip
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (a, b), strict=True):
        path.write_text(json.dumps(data))
    assert script.main([str(paths[0]), str(paths[1]), "--variants", "tuned", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert result["paired_fits"] == 2 and [r["model"] for r in result["models"]] == ["abmil (tuned)"]
    assert result["overall"]["balanced_accuracy"]["mean"] == pytest.approx(0.1)
