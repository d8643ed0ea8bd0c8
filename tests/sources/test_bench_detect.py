"""benchmarks/bench_detect.py runs in-process on a few real BCCD fields and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_bench_detect_main_on_a_few_fields(
    bccd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], load_benchmark
) -> None:
    bench = load_benchmark("bench_detect")
    assert bench.main(["--data", str(bccd_dir), "--limit", "6", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["fields"] == 6
    for method in ("baseline", "detector"):
        row = result["wbc"][method]["all"]
        assert row["boxes"] >= 6 and 0 <= row["recall"] <= 1 and 0 <= row["precision"] <= 1
    assert result["wbc"]["detector"]["all"]["recall"] == 1.0
    assert result["rbc"]["all"]["recall"] > 0.8 and result["rbc"]["all"]["precision"] is None
    assert set(result["checks"]) == {
        "recall_target", "precision_target", "recall_not_below_baseline", "precision_not_below_baseline"
    }  # fmt: skip
    table = capsys.readouterr().out
    assert "| detector | all |" in table and "| baseline | all |" in table and "| rbc | all |" in table
