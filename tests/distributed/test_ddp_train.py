"""DDP training under torchrun (2 gloo processes) matches single-process training of the same fold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from feature_cache.distributed import RankInfo
from milcore.cli import main
from milcore.training.distributed import DistributedBagSampler

#: Tolerance of DDP vs one process: gradients are summed in another order (observed differences ~1e-6).
TOL = 1e-4
ARGS = ["--task", "dx", "--model", "abmil", "--epochs", "3", "--patience", "3", "--lr", "2e-3",
        "--batch-instances", "256", "--seed", "3", "--folds", "3", "--fold", "1", "--device", "cpu"]  # fmt: skip


def test_sampler_splits_each_global_batch_by_instances() -> None:
    rng = np.random.default_rng(1)
    sizes = rng.integers(5, 500, size=60)  # 100x spread
    order = rng.permutation(60)
    shares = [DistributedBagSampler(sizes, 1000, RankInfo(r, 2)).batches(order) for r in range(2)]
    single = DistributedBagSampler(sizes, 1000, RankInfo(0, 1)).batches(order)
    assert [list(g) for g, _ in shares[0]] == [list(g) for g, _ in single], "the single process's batches"
    for (group, a), (_, b) in zip(*shares, strict=True):
        assert sorted([*a, *b]) == sorted(group) and not set(a) & set(b)
        loads = sizes[a].sum(), sizes[b].sum()
        assert abs(loads[0] - loads[1]) <= sizes[group].max()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(planted_factory, tmp_path: Path) -> None:
    data = planted_factory(tmp_path / "data", n_bags=18)
    inputs = ["--bank", str(data["bank"]), "--cohort", str(data["cohort"])]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "milcore", "-q",
           "train", *inputs, *ARGS, "--out", str(tmp_path / "ddp")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["-q", "train", *inputs, *ARGS, "--out", str(tmp_path / "one")]) == 0
    a = json.loads((tmp_path / "ddp" / "fold_1" / "metrics.json").read_text())
    b = json.loads((tmp_path / "one" / "fold_1" / "metrics.json").read_text())
    assert a.keys() == b.keys()
    for key, value in b.items():
        assert a[key] == pytest.approx(value, abs=TOL, nan_ok=True), key
    ha = json.loads((tmp_path / "ddp" / "fold_1" / "history.json").read_text())
    hb = json.loads((tmp_path / "one" / "fold_1" / "history.json").read_text())
    for ra, rb in zip(ha, hb, strict=True):
        for key in ("train_loss", "val_loss", "val_balanced_accuracy"):
            assert ra[key] == pytest.approx(rb[key], abs=TOL), key
    assert (tmp_path / "ddp" / "fold_1" / "model.safetensors").is_file(), "rank 0 wrote the checkpoint"
    assert "world_size: 2" in (tmp_path / "ddp" / "config.yaml").read_text()


def test_torchrun_train_needs_a_fold(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["train", "--bank", "b.h5", "--cohort", "c.csv", "--task", "dx", "--out", str(tmp_path / "x")])
    assert rc == 2 and "add --fold K" in capsys.readouterr().err


def test_torchrun_train_refuses_resume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["train", "--bank", "b.h5", "--cohort", "c.csv", "--task", "dx", "--fold", "0", "--resume",
               "--out", str(tmp_path / "x")])  # fmt: skip
    assert rc == 2 and "single-process only" in capsys.readouterr().err
