"""``milcore bench --tune N``: equal budgets, nested patient-level CV, bad options, failed folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_cache.errors import InvalidArgumentError
from milcore.bench.config import BenchSpec, TuneSpec
from milcore.bench.tune import SHARED_SPACE, check_tune_spec, compare_tuning, full_space, model_space
from milcore.cli import main
from milcore.models.search import SearchDim
from milcore.training.config import TrainConfig

FAST = TrainConfig(epochs=2, patience=2, min_epochs=1, lr=5e-3, batch_instances=256, device="cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _agg(bench_bank: dict, out: Path, *extra: str) -> list[str]:
    return ["bench", "aggregators", "--bank", str(bench_bank["bank"]), "--cohort", str(bench_bank["cohort"]),
            "--task", "dx", "--folds", "3", "--seeds", "0", "--epochs", "2", "--threads", "1", "--device", "cpu",
            "--peers", "none", "--workers", "1", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize(("extra", "needle"), [
    (("--tune", "2", "--search", "abmil.nope=3"), "declares no search dimension 'nope'"),
    (("--tune", "2", "--search", "abmil.embed_dim=4:8"), "outside the declared search space [64, 512]"),
    (("--tune", "2", "--search", "lr=1:2"), "outside the declared search space"),
    (("--tune", "2", "--search", "mean.gated=true"), "declares no search dimension 'gated'"),
    (("--tune", "2", "--search", "transmil.dim=64"), "'transmil' is not benchmarked"),
    (("--tune", "2", "--search", "embed_dim=64"), "not a shared dimension"),
    (("--search", "lr=1e-3"), "pass --tune N as well"),
    (("--tune-min-gain-se", "2"), "--tune-min-gain-se sets how the models are tuned: pass --tune N as well"),
    (("--inner-folds", "5", "--no-tune-prune"), "--inner-folds, --tune-prune set how the models are tuned"),
    (("--tune-confirm",), "--tune-confirm sets how the models are tuned: pass --tune N as well"),
    (("--tune", "2", "--search", "lr"), "expected [MODEL.]KEY=SPEC"),
])  # fmt: skip
def test_search_options_outside_the_declared_space_are_one_line_errors(
    bench_bank: dict, tmp_path: Path, capsys, extra: tuple[str, ...], needle: str
) -> None:
    assert main(_agg(bench_bank, tmp_path / "o", "--models", "abmil,mean", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists(), "nothing is written for a refused run"


def test_restrictions_narrow_fix_or_pick_within_the_declared_space() -> None:
    space = model_space("abmil", False, {"lr": "1e-3", "abmil.embed_dim": "64:128", "abmil.gated": "true"})
    assert space["lr"] == SearchDim(choices=(0.001,))
    assert space["embed_dim"] == SearchDim(64, 128, log=True)
    assert space["gated"] == SearchDim(choices=(True,))
    peer = full_space("abmil", True)
    assert set(peer) == {"lr", "weight_decay", "instance_dropout"}, "a peer is tuned over the shared training dims"
    assert set(SHARED_SPACE) <= set(full_space("abmil", False)) | {"dropout"}


def test_check_tune_spec_names_the_option(bench_bank: dict) -> None:
    spec = BenchSpec(str(bench_bank["bank"]), str(bench_bank["cohort"]), "dx", models=("abmil",), peers=(),
                     tune=TuneSpec(trials=2, search={"abmil.attention_dim": "1000"}))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=r"--search abmil.attention_dim=1000: 1000 is outside"):
        check_tune_spec(spec)


@pytest.fixture(scope="module")
def tuned(bench_bank: dict, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> tuple[int, dict, str]:
    out = tmp_path_factory.mktemp("tuned") / "run"
    rc = main(_agg(bench_bank, out, "--models", "abmil,mean", "--tune", "2", "--search", "abmil.embed_dim=64:96",
                   "--search", "abmil.attention_dim=32:48", "--search", "mean.embed_dim=64:96"))  # fmt: skip
    return rc, json.loads((out / "bench.json").read_text()), (out / "table.md").read_text()


def test_tuned_rows_stand_beside_the_default_ones_with_the_budget(tuned: tuple[int, dict, str]) -> None:
    rc, result, table = tuned
    assert rc == 0
    keys = [(s["model"], s["variant"]) for s in result["summary"]]
    assert sorted(keys) == [("abmil", "default"), ("abmil", "tuned"), ("mean", "default"), ("mean", "tuned")]
    budget = result["tuning"]["budget"]
    assert budget["trials"] == 2 and budget["inner_folds"] == 3
    assert budget["confirm"] is False and budget["min_gain_se"] == 1, "the defaults of the CLI"
    assert budget["spaces"]["abmil"]["embed_dim"] == "[64, 96] (log scale)"
    tuned_runs = [r for r in result["runs"] if r["variant"] == "tuned"]
    assert len(tuned_runs) == 2 * 3
    for r in tuned_runs:
        assert r["tuning"]["trials"] == 2 and r["tuning"]["inner_folds"] == 3
        assert 64 <= r["settings"]["embed_dim"] <= 96 and 1e-4 <= r["settings"]["lr"] <= 3e-3
    assert set(result["tuning"]["comparison"]) == {"milcore:abmil", "milcore:mean"}
    assert "Tuning budget, the same for every model: 2 Optuna trials" in table and "abmil (tuned)" in table
    assert "retrained on fresh inner folds" not in table


def test_inner_folds_never_see_an_outer_test_bag(bench_bank: dict) -> None:
    from milcore.bench.aggregators import Task, _load
    from milcore.bench.tune import inner_folds

    spec = BenchSpec(str(bench_bank["bank"]), str(bench_bank["cohort"]), "dx", models=("mean",), peers=(),
                     folds=3, seeds=(0,), tune=TuneSpec(trials=1))  # fmt: skip
    ctx = {"spec": spec, **_load(spec)}
    for fold in ctx["folds"][0]:
        inner = inner_folds(Task("mean", False, 0, fold.index, "tuned"), fold, ctx)
        assert len(inner) == 3
        seen = {b for f in inner for part in (f.train, f.val, f.test) for b in part}
        assert seen == set(fold.train) | set(fold.val) and not seen & set(fold.test)
        tested = [b for f in inner for b in f.test]
        assert sorted(tested) == sorted(seen), "every pooled bag is tested exactly once in the inner CV"


def test_one_failing_fold_is_reported_and_the_other_rows_complete(
    bench_bank: dict, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from milcore.training import fold as fold_module

    real = fold_module.fit_fold

    def flaky(config, data, fold, *args, **kwargs):
        if config.model == "max" and fold.index == 1:
            raise RuntimeError("simulated divergence")
        return real(config, data, fold, *args, **kwargs)

    monkeypatch.setattr(fold_module, "fit_fold", flaky)
    out = tmp_path / "o"
    assert main(_agg(bench_bank, out, "--models", "mean,max")) == 1
    result = json.loads((out / "bench.json").read_text())
    by = {s["model"]: s for s in result["summary"]}
    assert by["mean"]["runs"] == 3 and "metrics" in by["mean"]
    assert by["max"]["status"] == "failed" and by["max"]["failed_runs"] == 1
    assert by["max"]["error"] == "RuntimeError: simulated divergence"
    assert result["failed"] == ["milcore:max:default"]
    table = (out / "table.md").read_text()
    assert "FAILED (1 of 3 runs)" in table and "max seed 0 fold 2/3: RuntimeError: simulated divergence" in table
    assert "1 model(s) failed" in capsys.readouterr().err


def test_compare_tuning_pairs_seed_and_fold_and_flags_a_worse_tuned_mean() -> None:
    def row(variant: str, fold: int, ba: float, chose_default: bool = False) -> dict:
        r = {"impl": "milcore", "model": "abmil", "variant": variant, "seed": 0, "fold": fold, "status": "ok",
             "balanced_accuracy": ba, "auroc": ba}  # fmt: skip
        if variant == "tuned":
            r["tuning"] = {"chose_default": chose_default}
        return r

    rows = [row("default", 0, 0.8), row("default", 1, 0.9), row("tuned", 0, 0.7), row("tuned", 1, 0.9, True),
            row("default", 2, 0.5)]  # fold 2 has no tuned pair  # fmt: skip
    comp = compare_tuning(rows)["milcore:abmil"]
    assert comp["pairs"] == 2 and comp["kept_defaults"] == 1
    assert comp["balanced_accuracy"]["default"] == pytest.approx(0.85)
    assert comp["balanced_accuracy"]["difference"] == pytest.approx(-0.05)
    assert comp["balanced_accuracy"]["below"] is True


@pytest.mark.parametrize("tune", [TuneSpec(trials=1), TuneSpec(trials=2, min_gain=1.0)])
def test_a_search_that_keeps_the_defaults_reproduces_the_default_row(bench_bank: dict, tune: TuneSpec) -> None:
    """Trial 1 is the model's defaults (its lr widening the shared range): with one trial, or when no trial
    beats the defaults by ``min_gain``, the tuned model *is* the default one, to the last digit."""
    from milcore.bench.aggregators import run_benchmark

    spec = BenchSpec(str(bench_bank["bank"]), str(bench_bank["cohort"]), "dx", models=("abmil",), peers=(),
                     folds=3, seeds=(0,), train=FAST, tune=tune, workers=1)  # fmt: skip
    result = run_benchmark(spec)
    runs = {(r["variant"], r["fold"]): r for r in result["runs"]}
    for fold in range(3):
        default, tuned = runs["default", fold], runs["tuned", fold]
        assert tuned["tuning"]["chose_default"] and tuned["tuning"]["defaults_in_space"]
        assert tuned["tuning"]["trials"] == tune.trials
        for m in ("balanced_accuracy", "auroc", "instance_auroc"):
            assert tuned[m] == default[m], (fold, m)
    comp = result["tuning"]["comparison"]["milcore:abmil"]
    assert comp["kept_defaults"] == 3 and not comp["auroc"]["below"]


def test_a_trial_replaces_the_defaults_only_when_it_beats_them_by_its_standard_errors() -> None:
    """The gain a trial needs is ``max(min_gain, min_gain_se * se)`` with ``se`` the paired bootstrap standard
    error of its inner-CV gain: a clear win passes, the same win on half the patients (a noisier inner CV)
    needs more, and ``min_gain_se=0`` falls back to the fixed margin."""
    from milcore.bench.tune import _gain_over_defaults
    from milcore.metrics.intervals import bootstrap_gain

    rng = np.random.default_rng(0)
    y = np.arange(80) % 2
    p_default = rng.random(80)
    p_best = np.clip(p_default + 0.35 * (y - 0.5) + 0.1 * rng.normal(size=80), 0, 1)
    default = (y, np.stack([1 - p_default, p_default], 1))
    best = (y, np.stack([1 - p_best, p_best], 1))
    gain, se, needed = _gain_over_defaults(default, best, TuneSpec(trials=2), seed=1)
    boot = bootstrap_gain("auroc", *default, best[1], n_boot=1000, seed=1)
    assert (gain, se) == (boot["gain"], boot["se"]) and se > 0.01
    assert needed == pytest.approx(max(0.01, se)) and gain > needed
    assert _gain_over_defaults(default, best, TuneSpec(trials=2, min_gain_se=0), seed=1)[2] == 0.01
    assert _gain_over_defaults(default, best, TuneSpec(trials=2, min_gain_se=3), seed=1)[2] == pytest.approx(3 * se)
    half = (y[:20], default[1][:20]), (y[:20], best[1][:20])
    assert _gain_over_defaults(*half, TuneSpec(trials=2), seed=1)[1] > se, "fewer patients, a noisier gain"
    with pytest.raises(RuntimeError, match="different inner patients"):
        _gain_over_defaults(default, (y[::-1], best[1]), TuneSpec(trials=2), seed=1)


@pytest.mark.parametrize("confirm", [False, True])
def test_the_tuning_record_says_what_gain_a_replacing_trial_had_and_needed(bench_bank: dict, confirm: bool) -> None:
    """With no margin at all, a trial that scores better than the defaults replaces them (with ``confirm``: only
    if it scores better again on fresh inner folds), and its record holds the gain, its standard error and the
    gain it needed (also where it did not replace them)."""
    from milcore.bench.aggregators import run_benchmark

    tune = TuneSpec(trials=4, min_gain=0, min_gain_se=0, prune=False, confirm=confirm)
    spec = BenchSpec(str(bench_bank["bank"]), str(bench_bank["cohort"]), "dx", models=("abmil",), peers=(),
                     folds=3, seeds=(0,), train=FAST, tune=tune, workers=1)  # fmt: skip
    result = run_benchmark(spec)
    records = [r["tuning"] for r in result["runs"] if r["variant"] == "tuned"]
    assert len(records) == 3
    for rec in records:
        if rec["best_gain"] is None:  # the defaults scored best: nothing to weigh
            assert rec["chose_default"] and rec["confirmed"] is None
            continue
        assert rec["gain_needed"] == 0 and rec["best_gain_se"] >= 0
        if not rec["best_gain"] >= 0 or not confirm:  # failed the first check, or no confirmation asked
            assert rec["chose_default"] == (not rec["best_gain"] >= 0), json.dumps(rec)
            assert rec["confirmed"] is None and rec["fits"] <= 4 * 3
            continue
        # passed it: confirmed on fresh inner folds (two times three more fits), replacing the defaults only then
        assert rec["confirm_gain_needed"] == 0 and rec["confirm_gain_se"] >= 0, json.dumps(rec)
        assert rec["confirmed"] == (rec["confirm_gain"] >= 0) and rec["chose_default"] == (not rec["confirmed"])
        assert rec["fits"] == 4 * 3 + 2 * 3
    assert any(rec["best_gain"] is not None for rec in records), "no trial scored above the defaults: no check"
    if confirm:
        assert any(rec["confirmed"] is not None for rec in records), "no trial passed the first check"
    budget = result["tuning"]["budget"]
    assert budget["min_gain_se"] == 0 and budget["confirm"] is confirm
    assert budget["max_fits_per_model_and_fold"] == (4 + 2 * confirm) * 3 + 1


def test_the_confirmation_uses_another_split_of_the_same_tuning_bags(bench_bank: dict, monkeypatch) -> None:
    """Fresh inner folds: the same pool of training + validation bags (never a test bag), split otherwise; a
    confirmation whose fit fails keeps the defaults and records why."""
    from milcore.bench import tune as tune_module
    from milcore.bench.aggregators import Task, run_benchmark
    from milcore.data.splits import make_folds

    bags = [f"b{i}" for i in range(32)]
    outer = make_folds(bags, np.arange(32) % 2, k=3, seed=0)[0]
    ctx = {"label_of": {b: i % 2 for i, b in enumerate(bags)}, "group_of": {b: b for b in bags}, "classes": [0, 1],
           "spec": BenchSpec("x.h5", "x.csv", "dx", tune=TuneSpec(trials=2))}  # fmt: skip
    task = Task(model="abmil", peer=False, seed=0, fold=0, variant="tuned")
    search = tune_module.inner_folds(task, outer, ctx)
    fresh = tune_module.inner_folds(task, outer, ctx, salt=tune_module.CONFIRM_SEED)
    assert [sorted(f.test) for f in search] != [sorted(f.test) for f in fresh], "the same split again"
    for folds in (search, fresh):
        tested = {b for f in folds for b in f.test}
        assert tested == set(outer.train) | set(outer.val) and not tested & set(outer.test)

    import milcore.training.fold as fold_module

    original = fold_module.fit_fold

    def failing(config, store, fold, **kwargs):
        if "confirming" in kwargs.get("desc", ""):
            raise FloatingPointError("the loss is NaN")
        return original(config, store, fold, **kwargs)

    monkeypatch.setattr(fold_module, "fit_fold", failing)
    tune = TuneSpec(trials=4, min_gain=0, min_gain_se=0, prune=False, confirm=True)
    spec = BenchSpec(str(bench_bank["bank"]), str(bench_bank["cohort"]), "dx", models=("abmil",), peers=(),
                     folds=3, seeds=(0,), train=FAST, tune=tune, workers=1)  # fmt: skip
    records = [r["tuning"] for r in run_benchmark(spec)["runs"] if r["variant"] == "tuned"]
    failed = [rec for rec in records if rec["confirm_error"] is not None]
    assert failed, "no confirmation ran"
    for rec in failed:
        assert rec["confirmed"] is False and rec["chose_default"]
        assert rec["confirm_error"] == "FloatingPointError: the loss is NaN"
