"""``milcore train`` checks every input before it creates anything, and ``--resume`` refuses other inputs
or options than the run was started with (issue 13 items 9, 10, 14 and the missing-value labels)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml

from milcore.cli import main

FAST = ["--model", "mean", "--folds", "3", "--epochs", "1", "-q"]


def _argv(planted: dict, out: Path, *extra: str, cohort: Path | None = None, bank: Path | None = None,
          quiet: bool = True) -> list[str]:  # fmt: skip
    return ["train", "--bank", str(bank or planted["bank"]), "--cohort", str(cohort or planted["cohort"]),
            "--task", "dx", "--out", str(out), *FAST[: len(FAST) - (not quiet)], *extra]  # fmt: skip


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with open(src, newline="") as f:
        rows = list(csv.reader(f))
    rows = [rows[0], *[r for r in (edit(list(r)) for r in rows[1:]) if r is not None]]
    with open(dst, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return dst


def test_na_labels_are_missing_not_a_class(planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spellings = iter(["NA", "null", "N/A", "NaN", "-", "?"])

    def edit(r: list[str]) -> list[str]:
        if r[1] == "control" and int(r[0][1:]) < 12:
            r[1] = next(spellings)
        return r

    cohort = _rewrite(planted["cohort"], tmp_path / "na.csv", edit)
    assert main(_argv(planted, tmp_path / "run", cohort=cohort, quiet=False)) == 0
    record = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert record["classes"] == ["control", "sick"]
    assert record["join"]["matched"] == 24
    err = capsys.readouterr().err
    assert "6 rows have no 'dx' label and are left out as missing" in err and "'NA' x1" in err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one_class", "column 'dx' joined with {bank}: 1 class found ('sick' (15 bags)); training needs at least 2"),
        ("few_patients", "class 'control' has 2 patients, fewer than --folds 3"),
        ("no_column", "no label column 'dx' (columns: patient_id, diagnosis, sex, age)"),
        ("duplicates", "duplicate bag ids in 'patient_id': 'p001' (line 3, line 32)"),
    ],
)
def test_bad_cohorts_are_named_and_leave_no_folder(
    planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    cohort = tmp_path / "cohort.csv"
    if case == "one_class":
        _rewrite(planted["cohort"], cohort, lambda r: r if r[1] == "sick" else None)
    elif case == "few_patients":
        _rewrite(planted["cohort"], cohort, lambda r: r if r[1] == "sick" or int(r[0][1:]) < 4 else None)
    elif case == "no_column":
        text = planted["cohort"].read_text()
        cohort.write_text(text.replace("patient_id,dx,", "patient_id,diagnosis,", 1))
    else:
        cohort.write_text(planted["cohort"].read_text() + "p001,control,F,1\n")
    assert main(_argv(planted, tmp_path / "run", cohort=cohort)) == 2
    err = capsys.readouterr().err
    assert message.format(bank=planted["bank"]) in err and str(cohort) in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--device", "tpu"], "--device 'tpu': unknown device"),
        (["--model-arg", "embed_dim=abc"], "--model-arg for 'mean'"),
        (["--model-arg", "embd_dim=3"], "did you mean 'embed_dim'"),
        (["--cells", "nowhere.csv"], "nowhere.csv: instance ground-truth table (--cells) not found"),
    ],
)
def test_bad_options_fail_before_the_run_folder_exists(
    planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(_argv(planted, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cuda_on_a_machine_without_it_leaves_nothing(planted: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(_argv(planted, tmp_path / "run", "--device", "cuda")) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(_argv(planted, tmp_path / "run", "--device", "cpu")) == 0, "the rerun is not blocked"


def test_overwrite_keeps_the_old_run_when_the_new_inputs_are_bad(planted: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_argv(planted, out)) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(_argv(planted, out, "--overwrite", "--device", "tpu")) == 2
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_failure_before_any_fold_progress_removes_the_folder(planted: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from feature_cache.errors import UserError
    from milcore.training.trainer import Trainer

    def fail(self, *args, state_path=None, **kwargs):
        raise UserError("simulated failure in fold 0")

    monkeypatch.setattr(Trainer, "fit", fail)
    assert main(_argv(planted, tmp_path / "run")) == 2
    assert not (tmp_path / "run").exists()

    def fail_later(self, *args, state_path=None, **kwargs):
        Path(state_path).write_bytes(b"state")  # an epoch's state: resumable progress
        raise UserError("simulated failure after an epoch")

    monkeypatch.setattr(Trainer, "fit", fail_later)
    assert main(_argv(planted, tmp_path / "run2")) == 2
    assert (tmp_path / "run2" / "fold_0" / "train_state.pt").exists(), "progress is kept for --resume"


@pytest.fixture(scope="module")
def finished(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(_argv(planted, out)) == 0
    return out


def _interrupted(finished: Path, where: Path) -> Path:
    """A copy of the finished run as if it had been killed during fold 2."""
    shutil.copytree(finished, where)
    shutil.rmtree(where / "fold_2")
    (where / "metrics.json").unlink()
    return where


@pytest.mark.parametrize(
    ("change", "was", "now"),
    [
        ("model", "model=mean", "model=abmil"),
        ("epochs", "epochs=1", "epochs=2"),
        ("bank", "bank={bank}", "bank={other} (other contents)"),
        ("labels", "cohort={cohort}", "(its contents changed)"),
        ("folds", "folds=3", "folds=4"),
    ],
)
def test_resume_with_other_inputs_or_options_is_refused_and_config_kept(
    planted: dict, planted_factory, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    change: str, was: str, now: str,
) -> None:  # fmt: skip
    out = _interrupted(finished, tmp_path / "run")
    config = (out / "config.yaml").read_bytes()
    argv = _argv(planted, out, "--resume")
    other = planted["bank"]
    if change == "model":
        argv[argv.index("mean")] = "abmil"
    elif change == "epochs":
        argv[argv.index("--epochs") + 1] = "2"
    elif change == "folds":
        argv[argv.index("--folds") + 1] = "4"
    elif change == "bank":  # same encoder, same bag ids, other features
        other = planted_factory(tmp_path / "other", seed=1)["bank"]
        argv[argv.index("--bank") + 1] = str(other)
    else:  # the same cohort file, one label changed since
        cohort = Path(finished.parent / "cohort.csv")
        _rewrite(planted["cohort"], cohort, lambda r: r)
        argv[argv.index("--cohort") + 1] = str(cohort)
        record = yaml.safe_load(config)
        record["run"]["cohort"] = str(cohort)
        record["inputs"]["cohort"] = str(cohort.resolve())
        (out / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        config = (out / "config.yaml").read_bytes()
        _rewrite(planted["cohort"], cohort, lambda r: [r[0], "sick" if r[0] == "p000" else r[1], *r[2:]])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--resume: {out} was trained with" in err
    assert was.format(bank=planted["bank"], cohort=finished.parent / "cohort.csv") in err, err
    assert now.format(other=other) in err, err
    assert (out / "config.yaml").read_bytes() == config, "a refused resume never rewrites config.yaml"
    assert not (out / "fold_2").exists()


def test_resume_with_the_same_inputs_from_a_moved_bank_and_another_device_continues(
    planted: dict, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _interrupted(finished, tmp_path / "run")
    moved = Path(shutil.copy(planted["bank"], tmp_path / "moved.h5"))
    assert main(_argv(planted, out, "--resume", "--device", "cpu", bank=moved, quiet=False)) == 0
    assert (out / "metrics.json").exists() and (out / "fold_2" / "checkpoint.json").exists()
    assert "moved" in capsys.readouterr().err


def test_train_config_file_keys_are_checked_with_the_file_named(
    planted: dict, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "trian:\n  epochs: 2\n": "unknown top-level key(s) 'trian' (did you mean 'train'?)",
        "train:\n  epoch: 2\n": "train: unknown training option(s) 'epoch' (did you mean 'epochs'?)",
        "train:\n  epochs: ten\n": "train: epochs must be a whole number, got 'ten'",
        "train:\n  lr: .inf\n": "train: lr must be a finite number",
        "train: [1, 2]\n": "'train' must be a mapping",
    }
    for text, message in cases.items():
        path = tmp_path / "opts.yaml"
        path.write_text(text)
        assert main(_argv(planted, tmp_path / "run", "--config", str(path))) == 2
        err = capsys.readouterr().err
        assert f"{path}: {message}" in err, err
        assert not (tmp_path / "run").exists()
    # a run's own config.yaml trains again with its options
    assert main(_argv(planted, tmp_path / "again", "--config", str(finished / "config.yaml"))) == 0


def test_bench_checks_device_and_cohort_before_creating_out(
    planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["bench", "aggregators", "--bank", str(planted["bank"]), "--task", "dx", "--models", "mean", "--peers",
            "none", "--folds", "3", "--seeds", "0", "--epochs", "1", "-q"]  # fmt: skip
    assert main([*base, "--cohort", str(planted["cohort"]), "--device", "tpu", "--out", str(tmp_path / "b1")]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err and not (tmp_path / "b1").exists()
    one = _rewrite(planted["cohort"], tmp_path / "one.csv", lambda r: r if r[1] == "sick" else None)
    assert main([*base, "--cohort", str(one), "--out", str(tmp_path / "b2")]) == 2
    assert "training needs at least 2 classes" in capsys.readouterr().err and not (tmp_path / "b2").exists()
