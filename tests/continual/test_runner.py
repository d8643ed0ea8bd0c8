"""``milcore continual`` end to end on a planted stream: results, report, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from milcore.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(tmp_path, config: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_every_strategy_end_to_end(stream_bank, make_config, tmp_path):
    names = ["finetune", "joint", "replay_random", "ewc", "lwf", "icarl", "milreplay", "confidence"]
    strategies = {n: {} for n in names} | {"milreplay_mixed": {"strategy": "milreplay", "random_share": 0.5}}
    names.append("milreplay_mixed")  # a variant of a registered strategy under its own name
    config = make_config(stream_bank, strategies=strategies, train={"epochs": 2, "lr": 0.005,
                           "batch_instances": 512, "device": "cpu"})  # fmt: skip
    out = tmp_path / "run"
    assert main(["-q", "continual", "--config", str(_write(tmp_path, config)), "--out", str(out)]) == 0
    summary = json.loads((out / "continual.json").read_text())
    assert list(summary) == names
    for entry in summary.values():
        assert 0.0 <= entry["average_accuracy"] <= 1.0
        assert entry["average_forgetting"] is not None
        assert entry["forward_transfer"] is None  # class-incremental: future classes unknown
        assert entry["accuracy_matrix"][1][0] is None and entry["accuracy_matrix"][0][0] is not None
        assert set(entry["per_class_balanced_accuracy"]) == {"c0", "c1", "c2", "c3"}
    for name in ("replay_random", "icarl", "milreplay", "confidence", "milreplay_mixed"):
        assert summary[name]["memory_instances"] == 200  # the budget, exactly
        memory = np.load(out / "streams" / name / "seed0" / "memory.npz", allow_pickle=False)
        assert memory["rows"].dtype == np.int64
    assert summary["finetune"]["memory_instances"] is None
    html = (out / "report.html").read_text()
    assert "Accuracy matrices" in html and "data:image/png;base64" in html
    assert (out / "report.md").exists() and (out / "scenario.json").exists()


def test_resume_equals_a_straight_run(stream_bank, make_config, tmp_path, monkeypatch):
    config = make_config(stream_bank, strategies={"milreplay": {}, "ewc": {}})
    path = _write(tmp_path, config)
    straight = tmp_path / "straight"
    assert main(["-q", "continual", "--config", str(path), "--out", str(straight)]) == 0

    import milcore.continual.runner as runner

    calls = {"n": 0}
    real = runner.train_task

    def crash_on_second_task(ctx, *args, **kwargs):
        calls["n"] += 1
        if ctx.task == 1:
            raise KeyboardInterrupt
        return real(ctx, *args, **kwargs)

    monkeypatch.setattr(runner, "train_task", crash_on_second_task)
    broken = tmp_path / "broken"
    assert main(["-q", "continual", "--config", str(path), "--out", str(broken)]) == 130
    assert (broken / "streams" / "milreplay" / "seed0" / "state.pt").exists()
    monkeypatch.setattr(runner, "train_task", real)
    assert main(["-q", "continual", "--config", str(path), "--out", str(broken)]) == 2  # needs --resume
    assert main(["-q", "continual", "--config", str(path), "--out", str(broken), "--resume"]) == 0
    a = json.loads((straight / "continual.json").read_text())
    b = json.loads((broken / "continual.json").read_text())
    for name in ("milreplay", "ewc"):
        np.testing.assert_allclose(a[name]["accuracy_matrix"][0], b[name]["accuracy_matrix"][0])
        assert a[name]["average_accuracy"] == pytest.approx(b[name]["average_accuracy"], abs=1e-9)
    ma = np.load(straight / "streams" / "milreplay" / "seed0" / "memory.npz")
    mb = np.load(broken / "streams" / "milreplay" / "seed0" / "memory.npz")
    np.testing.assert_array_equal(ma["rows"], mb["rows"])


def test_resume_with_a_bank_lacking_the_memory_bags(stream_bank, make_config, stream_bank_factory, tmp_path, capsys,
                                                    monkeypatch):  # fmt: skip
    import shutil

    from feature_cache.bank import open_reader, open_writer
    from feature_cache.bank.merge import copy_bags

    bank, cohort = tmp_path / "bank.h5", tmp_path / "cohort.csv"
    shutil.copy(stream_bank["bank"], bank)
    shutil.copy(stream_bank["cohort"], cohort)
    config = make_config({"bank": bank, "cohort": cohort}, strategies={"milreplay": {}})
    path = _write(tmp_path, config)
    out = tmp_path / "run"
    import milcore.continual.runner as runner

    real = runner.train_task

    def stop(ctx, *args, **kwargs):
        if ctx.task == 1:
            raise KeyboardInterrupt
        return real(ctx, *args, **kwargs)

    monkeypatch.setattr(runner, "train_task", stop)
    assert main(["-q", "continual", "--config", str(path), "--out", str(out)]) == 130
    monkeypatch.setattr(runner, "train_task", real)
    state = torch.load(out / "streams" / "milreplay" / "seed0" / "state.pt", weights_only=True)
    kept = set(state["memory"]["bag_ids"])
    other = stream_bank_factory(tmp_path / "other", seed=1)  # same bag ids, re-extracted ...
    with open_reader(other["bank"]) as reader, open_writer(bank, reader.info, mode="w") as w:
        copy_bags(reader, w, [b for b in reader.bag_ids() if b not in kept])  # ... without the stored bags
    lines = [ln for ln in other["cohort"].read_text().splitlines() if ln.split(",")[0] not in kept]
    cohort.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = main(["-q", "continual", "--config", str(path), "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert "missing from this bank" in err and sorted(kept)[0] in err


def test_bad_input_one_line_errors(stream_bank, make_config, tmp_path, capsys):
    small = make_config(stream_bank, memory={"budget": 3, "per_bag": 1})
    code = main(["-q", "continual", "--config", str(_write(tmp_path, small)), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "smaller than one instance per class" in err and len(err.strip().splitlines()) == 1
    bad = make_config(stream_bank, scenario={"kind": "class_incremental", "tasks": [["c0", "c1"], ["c2", "c7"]]})
    assert main(["continual", "--config", str(_write(tmp_path, bad)), "--out", str(tmp_path / "b")]) == 2
    assert "c7" in capsys.readouterr().err
    assert main(["continual", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "c")]) == 2
    assert "configuration not found" in capsys.readouterr().err
    typo = make_config(stream_bank, trian={})
    assert main(["continual", "--config", str(_write(tmp_path, typo)), "--out", str(tmp_path / "d")]) == 2
    assert "unknown key(s) 'trian' (did you mean 'train'?)" in capsys.readouterr().err


def test_resume_refuses_a_changed_configuration(stream_bank, make_config, tmp_path, capsys):
    config = make_config(stream_bank, strategies={"finetune": {}}, train={"epochs": 1, "device": "cpu"})
    out = str(tmp_path / "run")
    assert main(["-q", "continual", "--config", str(_write(tmp_path, config)), "--out", out]) == 0
    config["memory"] = {"budget": 100, "per_bag": 10}
    assert main(["-q", "continual", "--config", str(_write(tmp_path, config)), "--out", out, "--resume"]) == 2
    assert "differs from the run being resumed (memory)" in capsys.readouterr().err


def test_domain_stream_with_amil_and_balanced_sampler(stream_bank, make_config, tmp_path):
    config = make_config(
        stream_bank,
        data={"bank": str(stream_bank["bank"]), "cohort": str(stream_bank["cohort"]), "label": "dx",
              "classes": ["c0", "c1", "c2", "c3"]},
        scenario={"kind": "domain_incremental", "column": "site"},
        model={"name": "amil", "args": {}},
        train={"epochs": 2, "lr": 0.005, "batch_instances": 512, "balance": "sampler", "device": "cpu"},
        strategies={"lwf": {}, "milreplay": {}},
    )  # fmt: skip
    out = tmp_path / "run"
    assert main(["-q", "continual", "--config", str(_write(tmp_path, config)), "--out", str(out)]) == 0
    summary = json.loads((out / "continual.json").read_text())
    for entry in summary.values():
        assert entry["forward_transfer"] is not None  # every task measurable before it is trained
        assert all(v is not None for row in entry["accuracy_matrix"] for v in row)
    assert summary["milreplay"]["memory_instances"] == 200


def test_balanced_sampler_draws_classes_equally():
    from milcore.training.loop import epoch_order  # shared by the trainer and continual learning

    labels = np.array([0] * 90 + [1] * 10)
    order = epoch_order(labels, 2, True, np.random.default_rng(0))
    share = np.mean(labels[order] == 1)
    assert 0.35 < share < 0.65
    np.testing.assert_array_equal(np.sort(epoch_order(labels, 2, False, np.random.default_rng(0))),
                                  np.arange(100))  # fmt: skip


def test_temporal_stream(stream_bank, make_config, tmp_path):
    config = make_config(
        stream_bank,
        data={"bank": str(stream_bank["bank"]), "cohort": str(stream_bank["cohort"]), "label": "dx"},
        scenario={"kind": "temporal", "column": "date", "periods": 2, "test_fraction": 0.3},
        train={"epochs": 1, "device": "cpu"},
        strategies={"replay_random": {}},
    )  # fmt: skip
    out = tmp_path / "run"
    assert main(["-q", "continual", "--config", str(_write(tmp_path, config)), "--out", str(out)]) == 0
    scenario = json.loads((out / "scenario.json").read_text())
    assert scenario["kind"] == "temporal" and len(scenario["tasks"]) == 2
    assert json.loads((out / "continual.json").read_text())["replay_random"]["memory_instances"] == 200


def test_class_stream_over_part_of_the_cohort(stream_bank, make_config, tmp_path):
    config = make_config(stream_bank, scenario={"kind": "class_incremental", "tasks": [["c3", "c1"], ["c0"]]},
                         train={"epochs": 1, "device": "cpu"}, strategies={"replay_random": {}})  # fmt: skip
    out = tmp_path / "run"
    assert main(["-q", "continual", "--config", str(_write(tmp_path, config)), "--out", str(out)]) == 0
    scenario = json.loads((out / "scenario.json").read_text())
    assert scenario["classes"] == ["c3", "c1", "c0"]  # c2's bags are not used
    summary = json.loads((out / "continual.json").read_text())["replay_random"]
    assert set(summary["per_class_balanced_accuracy"]) == {"c3", "c1", "c0"}
