"""The aggregator benchmark on a tiny planted bank: shared splits, metrics, costs, peers, OOD, outputs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_cache.errors import UserError
from milcore.bench import PEER_MODELS
from milcore.bench.aggregators import BenchSpec, check_models, compare_peers, run_benchmark
from milcore.bench.report import markdown_table, write_outputs
from milcore.metrics import mean_ci
from milcore.training.config import TrainConfig

HAVE_TORCHMIL = importlib.util.find_spec("torchmil") is not None  # the optional `peers` extra
FAST = TrainConfig(epochs=12, patience=12, min_epochs=1, lr=5e-3, batch_instances=256, device="cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread (several threads thrash on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def result(bench_bank: dict, one_thread: None) -> dict:
    spec = BenchSpec(str(bench_bank["bank"]), str(bench_bank["cohort"]), "dx", models=("abmil", "mean"),
                     peers=("abmil",), folds=3, seeds=(0, 1), train=FAST, ood_site="1")  # fmt: skip
    return run_benchmark(spec)


def test_every_model_sees_the_same_splits(result: dict) -> None:
    rows = result["runs"]
    assert len(rows) == (2 + HAVE_TORCHMIL) * 3 * 2  # models (2 ours + 1 peer when installed) x folds x seeds
    for seed in (0, 1):
        tests = {}
        for r in rows:
            if r["seed"] == seed:
                tests.setdefault((r["impl"], r["model"]), []).append((r["fold"], r["n_train"], r["n_test"]))
        assert len({tuple(v) for v in tests.values()}) == 1, "all models must run the same folds"
    assert result["splits"]["0"] != result["splits"]["1"], "each seed has its own splits"
    held = {b for f in result["splits"]["0"] for part in ("train", "val", "test") for b in f[part]}
    assert not held & {f"p{i:03d}" for i in range(3, 48, 4)}, "the OOD site never enters cross-validation"


def test_metrics_costs_and_ground_truth(result: dict) -> None:
    by = {(s["impl"], s["model"]): s for s in result["summary"]}
    ours = by[("milcore", "abmil")]["metrics"]
    assert ours["balanced_accuracy"]["mean"] >= 0.8, "the planted signal must be learnt"
    assert ours["instance_auroc"]["mean"] >= 0.65, "attention must prefer the planted cells (uniform: 0.5)"
    assert by[("milcore", "mean")]["metrics"]["instance_auroc"]["mean"] == pytest.approx(0.5)  # uniform attention
    if not HAVE_TORCHMIL:
        assert by[("torchmil", "abmil")] == {"impl": "torchmil", "model": "abmil", "status": "not installed"}
    for s in by.values():
        if s.get("status") == "not installed":
            continue
        m = s["metrics"]
        for key in ("balanced_accuracy", "macro_f1", "auroc", "ece", "ood_balanced_accuracy", "ood_auroc"):
            assert len(m[key]["values"]) == 6 and 0.0 <= m[key]["mean"] <= 1.0
            lo, hi = m[key]["ci95"]
            assert lo <= m[key]["mean"] <= hi
        assert m["train_bags_per_s"]["mean"] > 0 and m["infer_ms_per_bag"]["mean"] > 0
        assert s["params"] > 0
    assert by[("milcore", "abmil")]["params"] != by[("milcore", "mean")]["params"]


def test_peer_comparison_and_outputs(result: dict, tmp_path: Path) -> None:
    if not HAVE_TORCHMIL:
        pytest.skip("torchmil is not installed (optional `peers` extra); its rows say 'not installed'")
    peers = result["peers"]
    assert set(peers) == {"abmil"} and peers["abmil"]["pairs"] == 6
    assert peers["abmil"]["speed_ratio"] > 0
    paths = write_outputs(result, tmp_path)
    payload = json.loads(paths["json"].read_text())
    assert payload["benchmark"] == "aggregators" and len(payload["runs"]) == 18
    table = paths["table"].read_text()
    assert "| torchmil abmil |" in table and "OOD bal. acc." in table and "inst. AUROC" in table
    html = paths["html"].read_text()
    assert "data:image/png;base64" in html and "balanced accuracy vs training bags/s" in html


def test_torchmil_missing_rows_say_not_installed(bench_bank: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import milcore.bench.peers as peers

    monkeypatch.setattr(peers, "import_torchmil", lambda: None)
    spec = BenchSpec(str(bench_bank["bank"]), str(bench_bank["cohort"]), "dx", models=("mean",), peers=("abmil",),
                     folds=3, seeds=(0,), train=FAST.__class__(epochs=1, min_epochs=1, device="cpu"))  # fmt: skip
    out = run_benchmark(spec)
    assert out["torchmil"] == "not installed"
    assert {"impl": "torchmil", "model": "abmil", "status": "not installed"} in out["summary"]
    assert "not installed" in markdown_table(out)


def test_bad_names_and_sites(bench_bank: dict) -> None:
    with pytest.raises(UserError, match=r"registered: .*abmil"):
        check_models(("abmil", "nope"), ())
    with pytest.raises(UserError, match="torchmil adapters"):
        check_models((), ("amil",))
    spec = BenchSpec(str(bench_bank["bank"]), str(bench_bank["cohort"]), "dx", models=("mean",), peers=(),
                     folds=3, seeds=(0,), train=FAST, ood_site="7")  # fmt: skip
    with pytest.raises(UserError, match="no bag has site = '7'"):
        run_benchmark(spec)


def test_mean_ci_and_paired_comparison() -> None:
    lo, hi = mean_ci(np.array([0.5, 0.6, 0.7, 0.8]), method="bootstrap")["ci95"]
    assert 0.5 <= lo < 0.65 < hi <= 0.8
    assert all(math.isnan(v) for v in mean_ci(np.array([0.5]), method="bootstrap")["ci95"])
    rows = [{"impl": impl, "model": "abmil", "seed": 0, "fold": f, "balanced_accuracy": acc + 0.01 * f,
             "train_bags_per_s": rate} for impl, acc, rate in (("milcore", 0.9, 300.0), ("torchmil", 0.5, 100.0))
            for f in range(4)]  # fmt: skip
    c = compare_peers(rows)["abmil"]
    assert c["difference_mean"] == pytest.approx(0.4) and c["match"] is False
    assert c["speed_ratio"] == pytest.approx(3.0)


@pytest.mark.parametrize("name", PEER_MODELS)
@pytest.mark.parametrize("num_classes", [2, 3])
def test_peer_adapters_follow_the_aggregator_contract(name: str, num_classes: int) -> None:
    pytest.importorskip("torchmil")
    from milcore.bench.peers import TorchmilAggregator

    torch.manual_seed(0)
    model = TorchmilAggregator(name, 16, num_classes)
    x, ptr = torch.randn(23, 16), torch.tensor([0, 5, 15, 23])
    labels = torch.tensor([0, 1, num_classes - 1])
    out = model.train()(x, ptr, labels=labels)
    assert out.logits.shape == (3, num_classes)
    loss = torch.nn.functional.cross_entropy(out.logits, labels) + sum(out.aux_losses.values())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert ("max_instance" in out.aux_losses) == (name == "dsmil")
    with torch.no_grad():
        out = model.eval()(x, ptr)
    att = out.attention if out.attention.ndim == 2 else out.attention[:, None]
    assert att.shape[0] == 23
    for b in range(3):
        assert torch.allclose(att[ptr[b] : ptr[b + 1]].sum(0), torch.ones(att.shape[1]), atol=1e-4)


def test_peak_memory_sees_an_allocation() -> None:
    import sys

    from milcore.bench.memory import PeakMemory

    if not sys.platform.startswith("linux"):
        pytest.skip("resident high-water mark is read from /proc on Linux")
    with PeakMemory("cpu") as peak:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        del block
    assert peak.mb is not None and 48 <= peak.mb <= 256
