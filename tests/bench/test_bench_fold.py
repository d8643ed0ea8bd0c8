"""``milcore bench aggregators --fold K`` (one task of a job array) and ``milcore report merge`` of the parts.

The parts of a job array joined by ``report merge`` must give the single-process benchmark: the same runs
(metrics per model, seed and fold) and the same summary (means, sd, bootstrap CIs), compared exactly;
only timing fields (wall, CPU, bags/s, ms/bag, peak memory) may differ. Every refusal is a one-line
error with exit code 2 and nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from milcore.cli import main

#: Run and summary fields that measure time or memory, not what was learnt: they differ between jobs.
TIMING = {"train_bags_per_s", "infer_ms_per_bag", "peak_mb", "fit_s", "cpu_s"}


def _agg(bench_bank: dict, out: Path, *extra: str) -> list[str]:
    return ["bench", "aggregators", "--bank", str(bench_bank["bank"]), "--cohort", str(bench_bank["cohort"]),
            "--task", "dx", "--folds", "3", "--epochs", "2", "--threads", "1", "--device", "cpu", "--workers", "1",
            "--models", "mean,abmil", "--peers", "none", "--ood-site", "1", "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def benches(bench_bank: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-process benchmark (seeds 0,1 x 3 folds) and four parts holding each (seed, fold) once:
    fold 0 (in 2 worker processes) and fold 1 of both seeds, fold 2 of seed 0, fold 2 of seed 1."""
    root = tmp_path_factory.mktemp("bench_fold")
    out = {"whole": root / "whole", "f0": root / "f0", "f1": root / "f1", "f2s0": root / "f2s0",
           "f2s1": root / "f2s1"}  # fmt: skip
    assert main(_agg(bench_bank, out["whole"], "--seeds", "0,1")) == 0
    # a job may use several cores: fold 0 trains in 2 worker processes (rows do not depend on it)
    assert main([*_agg(bench_bank, out["f0"], "--seeds", "0,1", "--fold", "0"), "--workers", "2"]) == 0
    assert main(_agg(bench_bank, out["f1"], "--seeds", "0,1", "--fold", "1")) == 0
    assert main(_agg(bench_bank, out["f2s0"], "--seeds", "0", "--fold", "2")) == 0
    assert main(_agg(bench_bank, out["f2s1"], "--seeds", "1", "--fold", "2")) == 0
    return out


def _load(folder: Path) -> dict:
    return json.loads((folder / "bench.json").read_text())


def _learnt(value):
    """``value`` without its timing fields (recursively)."""
    if isinstance(value, dict):
        return {k: _learnt(v) for k, v in value.items()
                if k not in TIMING and k not in ("seconds", "cpu_seconds", "peak_mb_max")}  # fmt: skip
    if isinstance(value, list):
        return [_learnt(v) for v in value]
    return value


def _parts(benches: dict[str, Path], *names: str) -> list[str]:
    return [str(benches[n]) for n in names]


def test_a_fold_part_holds_one_fold_and_records_what_a_merge_checks(benches: dict[str, Path]) -> None:
    part, whole = _load(benches["f1"]), _load(benches["whole"])
    assert part["spec"]["fold"] == 1 and part["spec"]["seeds"] == [0, 1] and whole["spec"]["fold"] is None
    assert {(r["seed"], r["fold"]) for r in part["runs"]} == {(0, 1), (1, 1)}
    assert [r["model"] for r in part["runs"]] == ["mean", "abmil"] * 2
    assert part["splits"] == whole["splits"], "every fold's split assignment, not only the part's"
    assert part["inputs"] == whole["inputs"] and len(part["inputs"]["bank_fingerprint"]) == 64
    assert "Part of a job array: fold 1 of 3 (--fold 1; folds 0 to 2) of seeds 0, 1;" in (
        benches["f1"] / "table.md").read_text()


def test_parts_merged_equal_the_single_process_benchmark(benches: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "merged"
    assert main(["report", "merge", *_parts(benches, "f2s1", "f0", "f2s0", "f1"), "--out", str(out)]) == 0
    merged, whole = _load(out), _load(benches["whole"])
    assert len(merged["runs"]) == len(whole["runs"]) == 2 * 3 * 2
    assert _learnt(merged["runs"]) == _learnt(whole["runs"]), "same rows, same order, same metrics (exactly)"
    assert _learnt(merged["summary"]) == _learnt(whole["summary"]), "means, sd and bootstrap CIs equal"
    for key in ("spec", "splits", "inputs", "classes", "class_counts", "peers", "warnings", "failed", "ood_bag_ids"):
        assert merged[key] == whole[key], key
    parts = merged["parts"]
    assert len(parts) == 4 and "sums over 4 jobs" in merged["timing"]
    assert [p["workers"] for p in parts] == [1, 2, 1, 1], "fold 0 really trained in 2 worker processes"
    assert merged["seconds"] == pytest.approx(sum(p["seconds"] for p in parts))
    assert merged["cpu_seconds"] == pytest.approx(sum(p["cpu_seconds"] for p in parts))
    for name in ("table.md", "report.html", "report.md"):
        assert (out / name).is_file(), name
    table, single = (out / "table.md").read_text(), (benches["whole"] / "table.md").read_text()
    assert table.splitlines()[:2] == single.splitlines()[:2]
    for got, want in zip(table.splitlines()[2:4], single.splitlines()[2:4], strict=True):
        assert got.split("|")[:6] == want.split("|")[:6], "metric columns equal (costs come from other jobs)"
    assert "4 jobs" in table and "fold 0 of 3" not in table


def test_a_seed_per_job_merges_too(bench_bank: dict, benches: dict[str, Path], tmp_path: Path) -> None:
    for seed in ("1", "0"):
        assert main(_agg(bench_bank, tmp_path / f"s{seed}", "--seeds", seed)) == 0
    out = tmp_path / "merged"
    assert main(["report", "merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(out)]) == 0
    merged, whole = _load(out), _load(benches["whole"])
    assert _learnt(merged["runs"]) == _learnt(whole["runs"]) and _learnt(merged["summary"]) == _learnt(whole["summary"])
    assert merged["spec"] == whole["spec"]


def test_fold_out_of_range_is_a_one_line_error(bench_bank: dict, tmp_path: Path, capsys) -> None:
    for k in ("3", "-1"):
        assert main(_agg(bench_bank, tmp_path / "o", "--seeds", "0", "--fold", k)) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--fold {k}: out of range, --folds 3 has folds 0 to 2") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_library_refuses_an_out_of_range_fold_before_reading(tmp_path: Path) -> None:
    from feature_cache.errors import InvalidArgumentError
    from milcore.bench.aggregators import run_benchmark
    from milcore.bench.config import BenchSpec

    with pytest.raises(InvalidArgumentError, match="--fold 5: out of range"):
        run_benchmark(BenchSpec(bank=str(tmp_path / "absent.h5"), cohort="absent.csv", task="dx", fold=5))


def _refused(args: list[str], capsys, *needles: str) -> str:
    assert main(["report", "merge", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_missing_fold_is_named(benches: dict[str, Path], tmp_path: Path, capsys) -> None:
    _refused([*_parts(benches, "f0", "f2s0", "f2s1"), "--out", str(tmp_path / "m")], capsys,
             "seed 0: fold(s) 1 of 3 (0 to 2) missing", "--seeds 0 --fold K", "--allow-partial")  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_a_pair_given_twice_is_refused(benches: dict[str, Path], tmp_path: Path, capsys) -> None:
    copy = tmp_path / "again"
    shutil.copytree(benches["f2s0"], copy)
    _refused([*_parts(benches, "f0", "f1", "f2s0", "f2s1"), str(copy), "--out", str(tmp_path / "m")], capsys,
             "seed 0 fold 2 given twice", str(copy))  # fmt: skip
    _refused([*_parts(benches, "f0", "f1", "f2s1"), str(benches["whole"]), "--out", str(tmp_path / "m")], capsys,
             "given twice")  # fmt: skip
    assert not (tmp_path / "m").exists()


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    payload = _load(dst)
    edit(payload)
    (dst / "bench.json").write_text(json.dumps(payload))
    return dst


@pytest.mark.parametrize(("what", "edit", "needle"), [
    ("epochs", lambda p: p["spec"]["train"].update(epochs=3), "spec.train.epochs"),
    ("models", lambda p: p["spec"].update(models=["mean"]), "spec.models"),
    ("task", lambda p: p["spec"].update(task="other"), "spec.task"),
    ("bank", lambda p: p["inputs"].update(bank_fingerprint="0" * 64), "inputs"),
    ("folds", lambda p: p["spec"].update(folds=4), "spec.folds"),
])  # fmt: skip
def test_parts_of_other_benchmarks_are_refused(benches: dict[str, Path], tmp_path: Path, capsys, what, edit,
                                               needle) -> None:  # fmt: skip
    other = _edited(benches["f1"], tmp_path / what, edit)
    err = _refused([*_parts(benches, "f0", "f2s0", "f2s1"), str(other), "--out", str(tmp_path / "m")], capsys,
                   needle, "only parts of one benchmark")  # fmt: skip
    assert err.split(": ")[1].startswith(str(other)) or str(other) in err
    assert not (tmp_path / "m").exists()


def test_a_bank_at_another_path_with_the_same_content_merges(benches: dict[str, Path], tmp_path: Path) -> None:
    """Jobs on other machines may mount the bank elsewhere: paths are compared through the fingerprints."""
    moved = _edited(benches["f1"], tmp_path / "moved", lambda p: p["spec"].update(bank="/elsewhere/bank.h5",
                                                                                    cohort="/elsewhere/cohort.csv"))
    out = tmp_path / "m"
    assert main(["report", "merge", *_parts(benches, "f0", "f2s0", "f2s1"), str(moved), "--out", str(out)]) == 0
    assert _load(out)["spec"]["bank"] == _load(benches["f0"])["spec"]["bank"]


def test_a_failed_run_in_a_part_fails_its_model_in_the_merge(benches: dict[str, Path], tmp_path: Path,
                                                              capsys) -> None:  # fmt: skip
    def fail(p: dict) -> None:
        row = p["runs"][1]
        p["runs"][1] = {k: row[k] for k in ("model", "impl", "variant", "seed", "fold")} | {
            "status": "failed", "error": "RuntimeError: out of memory"}

    broken = _edited(benches["f1"], tmp_path / "broken", fail)
    out = tmp_path / "m"
    assert main(["report", "merge", *_parts(benches, "f0", "f2s0", "f2s1"), str(broken), "--out", str(out)]) == 1
    merged = _load(out)
    abmil = next(s for s in merged["summary"] if s["model"] == "abmil")
    assert abmil["status"] == "failed" and abmil["failures"] == [{"seed": 0, "fold": 1,
                                                                  "error": "RuntimeError: out of memory"}]
    assert merged["failed"] == ["milcore:abmil:default"]
    assert "FAILED: abmil seed 0 fold 2/3: RuntimeError: out of memory" in (out / "table.md").read_text()


def test_other_splits_are_refused(benches: dict[str, Path], tmp_path: Path, capsys) -> None:
    def swap(p: dict) -> None:
        folds = p["splits"]["0"]
        folds[0]["test"], folds[1]["test"] = folds[1]["test"], folds[0]["test"]

    other = _edited(benches["f1"], tmp_path / "splits", swap)
    _refused([*_parts(benches, "f0", "f2s0", "f2s1"), str(other), "--out", str(tmp_path / "m")], capsys,
             "the splits of seed 0 differ")  # fmt: skip


def test_not_a_bench_part_and_mixed_inputs_are_refused(benches: dict[str, Path], tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    _refused([str(benches["f0"]), str(tmp_path / "run"), "--out", str(tmp_path / "m")], capsys,
             "not a benchmark folder", "merge training runs and benchmarks separately")  # fmt: skip
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bench.json").write_text("{not json")
    _refused([str(benches["f0"]), str(broken), "--out", str(tmp_path / "m")], capsys, "bench.json: unreadable")
    old = _edited(benches["f1"], tmp_path / "old", lambda p: p.pop("inputs"))
    _refused([str(benches["f0"]), str(old), "--out", str(tmp_path / "m")], capsys, "no inputs", "rerun that part")


def test_an_occupied_out_is_not_overwritten(benches: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _refused([*_parts(benches, "f0", "f1", "f2s0", "f2s1"), "--out", str(out)], capsys, "pass --overwrite")
    assert (out / "keep.txt").read_text() == "x"
    _refused([*_parts(benches, "f0", "f1", "f2s0", "f2s1"), "--out", str(benches["f0"])], capsys,
             "also an input")  # fmt: skip


def test_fold_parts_with_tuning_merge_to_the_tuned_benchmark(bench_bank: dict, tmp_path: Path) -> None:
    """``--tune N`` tunes inside each outer fold (nested CV), so a fold part tunes its fold as the whole run does."""
    tune = ("--models", "mean", "--seeds", "0", "--tune", "2", "--inner-folds", "3")
    assert main(_agg(bench_bank, tmp_path / "whole", *tune)) == 0
    for k in range(3):
        assert main(_agg(bench_bank, tmp_path / f"f{k}", *tune, "--fold", str(k))) == 0
    part = _load(tmp_path / "f1")
    assert [(r["fold"], r["variant"]) for r in part["runs"]] == [(1, "default"), (1, "tuned")]
    out = tmp_path / "merged"
    assert main(["report", "merge", *(str(tmp_path / f"f{k}") for k in (2, 0, 1)), "--out", str(out)]) == 0
    merged, whole = _load(out), _load(tmp_path / "whole")
    assert _learnt(merged["runs"]) == _learnt(whole["runs"]) and _learnt(merged["summary"]) == _learnt(whole["summary"])
    assert merged["tuning"] == whole["tuning"]


def test_the_options_a_part_may_change_are_those_a_resumed_run_may() -> None:
    from milcore.bench.merge import WHERE_KEYS
    from milcore.crossval.resume import RESUMABLE_CHANGES

    assert WHERE_KEYS == RESUMABLE_CHANGES


def test_fold_parts_with_a_torchmil_peer_merge_to_the_benchmark(bench_bank: dict, tmp_path: Path) -> None:
    """The peer rows and the ours-vs-torchmil comparison are joined like ours."""
    pytest.importorskip("torchmil", reason="the peers extra (torchmil) is not installed")
    base = ["bench", "aggregators", "--bank", str(bench_bank["bank"]), "--cohort", str(bench_bank["cohort"]),
            "--task", "dx", "--folds", "3", "--epochs", "1", "--threads", "1", "--device", "cpu", "--workers", "1",
            "--models", "abmil", "--peers", "abmil", "--seeds", "0"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    for k in range(3):
        assert main([*base, "--fold", str(k), "--out", str(tmp_path / f"f{k}")]) == 0
    out = tmp_path / "merged"
    assert main(["report", "merge", *(str(tmp_path / f"f{k}") for k in range(3)), "--out", str(out)]) == 0
    merged, whole = _load(out), _load(tmp_path / "whole")
    order = [(impl, f) for f in range(3) for impl in ("milcore", "torchmil")]
    assert [(r["impl"], r["fold"]) for r in merged["runs"]] == order
    assert _learnt(merged["runs"]) == _learnt(whole["runs"]) and _learnt(merged["summary"]) == _learnt(whole["summary"])
    keep = ("metric", "pairs", "difference_mean", "difference_ci95", "match")
    assert {k: merged["peers"]["abmil"][k] for k in keep} == {k: whole["peers"]["abmil"][k] for k in keep}
    assert merged["torchmil"] == whole["torchmil"]


def test_allow_partial_marks_the_result_partial_everywhere(benches: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    assert main(["report", "merge", *_parts(benches, "f0", "f2s0", "f2s1"), "--allow-partial", "--out", str(out)]) == 0
    merged = _load(out)
    assert merged["partial"]["missing"] == [{"seed": 0, "folds": [1]}, {"seed": 1, "folds": [1]}]
    assert merged["warnings"][0]["code"] == "partial" and merged["warnings"][0]["severity"] == "critical"
    assert {(r["seed"], r["fold"]) for r in merged["runs"]} == {(0, 0), (1, 0), (0, 2), (1, 2)}
    assert all(s["runs"] == 4 for s in merged["summary"])
    message = "PARTIAL benchmark (merged with --allow-partial): seed 0: fold(s) 1; seed 1: fold(s) 1 of 3 missing"
    assert (out / "table.md").read_text().startswith(f"**{message}")
    assert message in (out / "report.md").read_text() and "(PARTIAL)" in (out / "report.html").read_text()
    assert message in capsys.readouterr().err
    whole = tmp_path / "whole"
    assert main(["report", "merge", *_parts(benches, "f0", "f1", "f2s0", "f2s1"), "--allow-partial", "--out",
                 str(whole)]) == 0  # fmt: skip
    assert "partial" not in _load(whole), "a whole benchmark is not marked partial"
    capsys.readouterr()
    (tmp_path / "run").mkdir()
    _refused([str(tmp_path / "run"), "--allow-partial", "--out", str(tmp_path / "r")], capsys,
             "--allow-partial: only for benchmark folders")  # fmt: skip
