"""benchmarks/bench_aggregators.py runs in-process with tiny sizes and writes its JSON."""

from __future__ import annotations

import json

import pytest

from milcore.models import list_aggregators

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_aggregators")


def test_quick_run_without_torchmil_prints_not_installed_rows(bench, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "import_torchmil", lambda: None)
    argv = ["--quick", "--out", str(tmp_path), "--rounds", "1", "--slice", "0", "--threads", "1"]
    argv += ["--scaling", "16", "32"]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "table.md").exists()
    ours = {c["model"] for c in data["cases"] if c["impl"] == "milcore" and c["bags_per_s"]}
    assert ours == set(list_aggregators())
    peers = [c for c in data["cases"] if c["impl"] == "torchmil"]
    assert peers and all(c["status"] == "not installed" and c["bags_per_s"] is None for c in peers)
    assert data["ratios"]["abmil"]["ratio"] is None and data["ratios"]["abmil"]["target"] == 1.5
    assert set(data["memory_scaling"]) == set(list_aggregators())
    assert "not installed" in capsys.readouterr().out


def test_peak_memory_sees_a_large_allocation(bench) -> None:
    import torch

    def allocate() -> None:
        t = torch.ones(4_000_000)  # 16 MB
        del t

    peak = bench.peak_memory_mb(allocate)
    if peak is None:
        pytest.skip("peak RSS is not measurable on this platform")
    assert 10 <= peak <= 200
