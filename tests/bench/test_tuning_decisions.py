"""benchmarks/tuning_decisions.py: the tuning's decision per outer fold beside the outer metrics it bought."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def script(load_benchmark):
    return load_benchmark("tuning_decisions")


def _run(variant: str, fold: int, auroc: float, **extra) -> dict:
    return {"model": "abmil", "impl": "milcore", "variant": variant, "seed": 0, "fold": fold, "status": "ok",
            "auroc": auroc, "balanced_accuracy": auroc - 0.2, **extra}  # fmt: skip


def _tuning(kept: bool, gain: float | None = None, se: float | None = None) -> dict:
    return {"tuning": {"chose_default": kept, "default_value": 0.7, "best_gain": gain, "best_gain_se": se,
                       "gain_needed": None if se is None else max(0.01, se)}}  # fmt: skip


def test_counts_replaced_folds_and_what_they_did_outside(script, tmp_path: Path) -> None:
    runs = [_run("default", f, 0.8) for f in range(4)] + [
        _run("tuned", 0, 0.8, **_tuning(True)),  # the defaults scored best
        _run("tuned", 1, 0.8, **_tuning(True, 0.02, 0.05)),  # a gain inside its noise: kept
        _run("tuned", 2, 0.9, **_tuning(False, 0.10, 0.03)),  # replaced, better outside
        _run("tuned", 3, 0.7, **_tuning(False, 0.08, 0.04)),  # replaced, worse outside
        _run("tuned", 4, 0.9, **_tuning(False, 0.08, 0.04)),  # no default fit of fold 4: not paired
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"runs": runs, "tuning": {"budget": {"trials": 20}}}))
    assert script.main([str(path), "--out", str(tmp_path / "out")]) == 0
    out = json.loads((tmp_path / "out" / "decisions.json").read_text())
    assert out["summary"]["fits"] == 4 and out["summary"]["replaced"] == 2
    auroc = out["summary"]["auroc"]
    assert (auroc["replaced_up"], auroc["replaced_down"], auroc["replaced_equal"]) == (1, 1, 0)
    assert auroc["replaced_mean_change"] == pytest.approx(0.0)
    assert out["rows"][1]["best_gain_se"] == 0.05 and out["tuning"] == {"trials": 20}
    md = (tmp_path / "out" / "decisions.md").read_text()
    assert "+0.100 ± 0.030" in md and "2 of 4 tuned fits replaced the defaults" in md
    assert out["summary"]["confirmations"] == 0 and "fresh inner folds" not in md, "a run before the confirmation"


def test_shows_the_confirmation_on_fresh_inner_folds(script, tmp_path: Path) -> None:
    confirmed = {"confirmed": True, "confirm_gain": 0.06, "confirm_gain_se": 0.02}
    rejected = {"confirmed": False, "confirm_gain": -0.01, "confirm_gain_se": 0.03}
    runs = [_run("default", f, 0.8) for f in range(2)] + [
        _run("tuned", 0, 0.9, tuning={**_tuning(False, 0.10, 0.03)["tuning"], **confirmed}),
        _run("tuned", 1, 0.8, tuning={**_tuning(True, 0.09, 0.03)["tuning"], **rejected}),
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"runs": runs}))
    assert script.main([str(path), "--out", str(tmp_path / "out")]) == 0
    out = json.loads((tmp_path / "out" / "decisions.json").read_text())
    assert (out["summary"]["confirmations"], out["summary"]["confirmed"], out["summary"]["replaced"]) == (2, 1, 1)
    md = (tmp_path / "out" / "decisions.md").read_text()
    assert "+0.060 ± 0.020" in md and "-0.010 ± 0.030" in md
    assert "2 winners were retrained on fresh inner folds; 1 held there." in md


def test_a_run_without_tuning_is_refused(script, tmp_path: Path, caplog) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"runs": [_run("default", 0, 0.8)]}))
    assert script.main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert "no tuned fit" in caplog.text and not (tmp_path / "out").exists()
