"""Training runs: learning, determinism, checkpoints, resume, predict, explain, CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_cache.errors import UserError
from milcore.cli import main
from milcore.crossval import train_run
from milcore.training.checkpoint import load_checkpoint, save_checkpoint
from milcore.training.config import RunSpec, TrainConfig

FAST = {"epochs": 12, "patience": 12, "lr": 2e-3, "batch_instances": 256}


def _spec(planted: dict, **kw) -> RunSpec:
    return RunSpec(str(planted["bank"]), str(planted["cohort"]), "dx", folds=3, n_boot=100, **kw)


@pytest.fixture(scope="module")
def run_dir(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "abmil"
    train_run(_spec(planted), TrainConfig(model="abmil", **FAST), out)
    return out


def test_run_folder_holds_everything(run_dir: Path) -> None:
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "splits.json", "metrics.json", "predictions.csv", "attention.h5", "report.html",
            "report.md"} <= names  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("balanced_accuracy", "macro_f1", "auroc", "ece"):
        assert len(metrics["mean"][key]["values"]) == 3 and key in metrics["per_fold"][0]
    assert metrics["balanced_accuracy"] >= 0.8, "the planted signal must be learnt"
    assert metrics["instance"]["instance_auroc"] >= 0.85
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64" in html and "Per fold" in html
    for fold in range(3):
        assert (run_dir / f"fold_{fold}" / "model.safetensors").exists()
        assert not (run_dir / f"fold_{fold}" / "train_state.pt").exists()


def test_same_seed_same_metrics(planted: dict, run_dir: Path, tmp_path: Path) -> None:
    again = train_run(_spec(planted), TrainConfig(model="abmil", **FAST), tmp_path / "again").metrics
    first = json.loads((run_dir / "metrics.json").read_text())
    assert again["per_fold"] == first["per_fold"] or all(
        a[k] == pytest.approx(b[k], abs=1e-9) for a, b in zip(again["per_fold"], first["per_fold"], strict=True)
        for k in ("balanced_accuracy", "auroc", "ece"))  # fmt: skip
    assert (tmp_path / "again" / "splits.json").read_text() == (run_dir / "splits.json").read_text()


def test_checkpoint_round_trip(run_dir: Path, tmp_path: Path) -> None:
    model, card = load_checkpoint(run_dir / "fold_0")
    assert card["classes"] == ["control", "sick"] and card["encoder"]["name"] == "toy"
    x, ptr = torch.randn(20, 8), torch.tensor([0, 12, 20])
    with torch.no_grad():
        before = model(x, ptr).logits
    save_checkpoint(tmp_path / "copy", model, classes=card["classes"], encoder=card["encoder"])
    again, _ = load_checkpoint(tmp_path / "copy")
    with torch.no_grad():
        assert torch.allclose(again(x, ptr).logits, before)
    (tmp_path / "copy" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        load_checkpoint(tmp_path / "copy")
    with pytest.raises(UserError, match="not a milcore checkpoint"):
        load_checkpoint(tmp_path)


def test_resume_continues_an_interrupted_run(planted: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(model="mean", **FAST)
    full = train_run(_spec(planted), cfg, out).metrics
    # simulate a crash after fold 0: remove the later folds' results
    for fold in (1, 2):
        for p in (out / f"fold_{fold}").iterdir():
            p.unlink()
    (out / "metrics.json").unlink()
    with pytest.raises(UserError, match="--resume"):
        train_run(_spec(planted), cfg, out)
    resumed = train_run(_spec(planted), cfg, out, resume=True).metrics
    assert [r["balanced_accuracy"] for r in resumed["per_fold"]] == pytest.approx(
        [r["balanced_accuracy"] for r in full["per_fold"]])  # fmt: skip


def test_predict_applies_the_fold_ensemble_and_refuses_other_encoders(
    run_dir: Path, planted: dict, planted_factory, tmp_path: Path
) -> None:
    assert main(["predict", "--checkpoint", str(run_dir), "--bank", str(planted["bank"]), "--out",
                 str(tmp_path / "pred"), "-q"]) == 0  # fmt: skip
    from milcore.data.predictions import read_attention, read_predictions

    table = read_predictions(tmp_path / "pred")
    att = read_attention(tmp_path / "pred")
    assert len(table.bag_ids) == 30 and np.allclose(table.proba.sum(1), 1)
    assert all(abs(a.sum() - 1) < 1e-4 for a in att.values())
    other = planted_factory(tmp_path / "other", encoder="another")
    code = main(["predict", "--checkpoint", str(run_dir / "fold_0"), "--bank", str(other["bank"]), "--out",
                 str(tmp_path / "p2")])  # fmt: skip
    assert code == 2


def test_explain_writes_galleries(run_dir: Path) -> None:
    assert main(["explain", "--run", str(run_dir), "-q"]) == 0
    summary = json.loads((run_dir / "explain" / "explain.json").read_text())
    assert summary["patients"] and (run_dir / "explain" / "explain.html").exists()
    first = next(iter(summary["patients"].values()))
    assert first["top"][0][1] >= first["lowest"][0][1]


def test_cli_train_end_to_end(planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = main(["train", "--bank", str(planted["bank"]), "--cohort", str(planted["cohort"]), "--task", "dx",
                 "--model", "mean", "--folds", "3", "--epochs", "3", "--out", str(out), "-q"])  # fmt: skip
    assert code == 0 and (out / "metrics.json").exists()
    assert main(["train", "--bank", str(planted["bank"]), "--cohort", str(planted["cohort"]), "--task", "dx",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nope"], "no label column 'nope'"),
        (["--model", "abmill"], "did you mean 'abmil'"),
        (["--folds", "20"], "fewer than --folds 20"),
        (["--model-arg", "hiddn_dim=3"], "unknown config field"),
    ],
)
def test_cli_train_bad_input(planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                             message: str) -> None:  # fmt: skip
    base = {"--bank": str(planted["bank"]), "--cohort": str(planted["cohort"]), "--task": "dx",
            "--out": str(tmp_path / "o"), "--epochs": "1"}  # fmt: skip
    for k, v in zip(args[::2], args[1::2], strict=True):
        base[k] = v
    argv = ["train", *[x for kv in base.items() for x in kv]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_streaming_from_the_bank_gives_the_same_batches_as_memory(planted: dict) -> None:
    from feature_cache.bank import open_reader
    from milcore.data.store import FeatureStore

    bank = open_reader(planted["bank"])
    ids = bank.bag_ids()
    memory = FeatureStore(bank, ids, memory_budget_bytes=1 << 30)
    stream = FeatureStore(bank, ids, memory_budget_bytes=0)
    assert memory.in_memory and not stream.in_memory
    order = np.random.default_rng(0).permutation(len(ids))
    a = list(memory.batches(order, budget=200, cap=20, seed=3))
    b = list(stream.batches(order, budget=200, cap=20, seed=3, num_workers=2))
    assert len(a) == len(b) and len(a) > 1
    for x, y in zip(a, b, strict=True):
        assert x.bag_ids == y.bag_ids and torch.equal(x.ptr, y.ptr)
        assert torch.equal(x.x, y.x), "sub-sampling is seeded per batch in both modes"
    c = list(stream.batches(order, budget=200, cap=0, num_workers=0))
    d = list(memory.batches(order, budget=200, cap=0))
    assert all(torch.equal(x.x, y.x) for x, y in zip(c, d, strict=True))


def test_tensorboard_logging_is_optional(planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--bank", str(planted["bank"]), "--cohort", str(planted["cohort"]), "--task", "dx", "--model",
            "mean", "--folds", "3", "--epochs", "1", "--out", str(tmp_path / "tb"), "--tensorboard", "-q"]  # fmt: skip
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert main(argv) == 2
        assert "pip install tensorboard" in capsys.readouterr().err
        return
    assert main(argv) == 0
    assert list((tmp_path / "tb" / "fold_0" / "tensorboard").iterdir())
