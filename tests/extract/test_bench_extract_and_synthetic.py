"""The extraction and synthetic-cohort benchmarks run in-process at tiny sizes and write their JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_bench_extract_quick(load_benchmark, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_benchmark("bench_extract").main(["--quick", "--workers", "0", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    row = result["rows"][0]
    assert row["encoder"] == "toy" and row["cells"] > 0 and row["ratio"] > 0
    memory = result["memory"]
    assert [memory["small"]["bags"], memory["large"]["bags"]] == [3, 6] and memory["large"]["cells"] == 60
    assert memory["holds"] and memory["large"]["growth_mb"] <= memory["bound_mb"]
    assert "end-to-end / bare" in capsys.readouterr().out


def test_bench_synthetic_quick(load_benchmark, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_benchmark("bench_synthetic").main(["--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {r["stage"] for r in result["rows"]} >= {"render", "write_cohort, 1 worker"}
    assert "crops/s" in capsys.readouterr().out


def test_bench_train_memory_quick(load_benchmark, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_benchmark("bench_train_memory").main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    modes = {(r["bags"], r["mode"]): r["in_memory"] for r in result["rows"]}
    assert modes[(6, "streaming")] is False and modes[(6, "in memory")] is True
    assert result["streaming_growth"] > 0 and "peak RSS" in capsys.readouterr().out
