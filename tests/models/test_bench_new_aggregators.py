"""benchmarks/bench_new_aggregators.py runs in-process at tiny sizes, and judges the peer targets correctly."""

from __future__ import annotations

import json
import types

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_new_aggregators")


def test_learning_part_writes_rows_per_model_and_seed(bench, tmp_path, monkeypatch) -> None:
    real = bench._learning_module()
    tiny = types.SimpleNamespace(**vars(real))
    tiny.make_bags = lambda num_bags, seed: real.make_bags(9, seed)
    tiny.train = lambda model, x, ptr, labels, control=None: real.train(model, x, ptr, labels, epochs=1)
    monkeypatch.setattr(bench, "_learning_module", lambda: tiny)
    models = ("dtfd", "clam_sb", "torchmil:clam_sb") if bench_peers_installed() else ("dtfd", "clam_sb")
    assert bench.main(["learning", "--models", ",".join(models), "--seeds", "0,1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {(r["model"], r["seed"]) for r in data["rows"]} == {(m, s) for m in models for s in (0, 1)}
    assert set(data["summary"]) == set(models) and data["target"] == 0.95
    for r in data["rows"]:  # bootstrap CIs over test bags hold the point estimate
        lo, hi = r["balanced_accuracy_ci95"]
        assert lo <= r["balanced_accuracy"] <= hi
    assert "| dtfd |" in (tmp_path / "table.md").read_text()


def bench_peers_installed() -> bool:
    from milcore.bench.peers import import_torchmil

    return import_torchmil() is not None


def _run(impl: str, seed: int, fold: int, ba: float, rate: float) -> dict:
    return {"model": "clam_sb", "impl": impl, "seed": seed, "fold": fold, "balanced_accuracy": ba,
            "train_bags_per_s": rate, "cpu_s": 100.0 / rate, "epochs_run": 10 if fold else 5,
            "n_train": 20}  # fmt: skip


def test_peers_part_judges_ci_and_speed(bench, tmp_path) -> None:
    runs = []
    for i in range(6):  # ours: same accuracy up to noise, 2x faster
        runs.append(_run("milcore", i // 3, i % 3, 0.8 + 0.05 * (-1) ** i, 40.0))
        runs.append(_run("torchmil", i // 3, i % 3, 0.8, 20.0))
    (tmp_path / "bench.json").write_text(json.dumps({"runs": runs, "summary": []}))
    assert bench.main(["peers", "--bench", str(tmp_path / "bench.json"), "--out", str(tmp_path / "out")]) == 0
    pair = json.loads((tmp_path / "out" / "bench.json").read_text())["pairs"]["clam_sb"]
    assert pair["within_ci"] and pair["speed_ratio"] == pytest.approx(2.0) and pair["meets_target"]
    assert pair["cpu_speed_ratio"] == pytest.approx(2.0)  # CPU s per trained bag: torchmil's / ours
    assert "| 2.00x |" in (tmp_path / "out" / "table.md").read_text()
    assert bench.main(["peers", "--bench", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o2")]) == 2
