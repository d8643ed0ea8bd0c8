"""benchmarks/profile_fit.py profiles one whole bench fit and lists its operators by self CPU time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_profiles_one_fit_and_writes_its_operator_table(load_benchmark, bench_bank, tmp_path: Path) -> None:
    script = load_benchmark("profile_fit")
    out = tmp_path / "profile"
    assert script.main(["--bank", str(bench_bank["bank"]), "--cohort", str(bench_bank["cohort"]), "--task", "dx",
                        "--model", "abmil", "--epochs", "1", "--top", "5", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "profile.json").read_text())
    ops = result["operators"]
    assert result["model"] == "abmil" and len(ops) == 5
    assert [o["self_cpu_ms"] for o in ops] == sorted((o["self_cpu_ms"] for o in ops), reverse=True)
    assert sum(o["share"] for o in ops) <= 1 + 1e-9 and all(o["calls"] >= 1 for o in ops)
    assert any(o["name"] in ("aten::addmm", "aten::mm") for o in ops), ops  # a fit multiplies matrices
    assert "| `" in (out / "profile.md").read_text()


def test_a_failing_bench_job_is_refused(load_benchmark, tmp_path: Path) -> None:
    script = load_benchmark("profile_fit")
    with pytest.raises(SystemExit):
        script.main(["--bank", str(tmp_path / "missing.h5"), "--cohort", str(tmp_path / "missing.csv"),
                     "--model", "abmil", "--out", str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out" / "profile.json").exists()
