"""The benchmark's worker pool: longest expected training first, and a worker that dies fails only the
trainings it could not run."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from milcore.bench import aggregators
from milcore.bench.aggregators import LongestFirst, Task, execute


def _tasks() -> list[Task]:
    return [Task(m, False, seed, fold) for seed in (0, 1) for fold in range(2) for m in ("big", "mid", "small")]


def test_unseen_kinds_first_in_task_order_then_longest_expected():
    tasks = _tasks()
    schedule = LongestFirst(tasks)
    first = [schedule.next() for _ in range(3)]
    assert [tasks[i].model for i in first] == ["big", "mid", "small"], "each kind measured once, in task order"
    for i, seconds in zip(first, (30.0, 5.0, 1.0), strict=True):
        schedule.finished(i, {"cpu_s": seconds})
    rest = []
    while (i := schedule.next()) is not None:
        rest.append(tasks[i].model)
    assert rest == ["big"] * 3 + ["mid"] * 3 + ["small"] * 3, "longest first: the pool ends on short trainings"


def test_estimates_follow_measured_means_and_tuned_go_first():
    tasks = [Task("a", False, 0, 0), Task("b", False, 0, 0), Task("a", False, 0, 1), Task("b", False, 0, 1),
             Task("a", False, 0, 2, "tuned")]  # fmt: skip
    schedule = LongestFirst(tasks)
    assert schedule.next() == 4, "a tuned training goes before every default one"
    schedule.finished(4, {"cpu_s": 100.0})
    assert schedule.next() == 0 and schedule.next() == 1
    schedule.finished(0, {"cpu_s": 2.0})
    schedule.finished(1, {"cpu_s": 3.0})
    schedule.finished(1, {"status": "failed"})  # a failed training carries no time: ignored
    assert tasks[schedule.next()].model == "b", "b's mean (3 s) above a's (2 s)"
    assert tasks[schedule.next()].model == "a"
    assert schedule.next() is None


class _Store:
    in_memory = True

    def __len__(self) -> int:
        return 4

    def gather(self, index: np.ndarray) -> None:
        return None


def _fake_run_task(task: Task, ctx: dict) -> dict:
    if task.model == "dies":
        os._exit(3)  # a worker killed mid-training (out of memory, a signal)
    return {"model": task.model, "impl": task.impl, "variant": task.variant, "seed": task.seed, "fold": task.fold,
            "status": "ok", "cpu_s": 0.01}  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool forks its workers (Linux)")
def test_pool_returns_rows_in_task_order_and_survives_a_dead_worker(monkeypatch):
    monkeypatch.setattr(aggregators, "run_task", _fake_run_task)
    ctx = {"store": _Store(), "spec": SimpleNamespace(folds=2)}
    tasks = _tasks()
    calls = []
    rows = execute(tasks, ctx, 2, lambda: calls.append(1))
    assert [(r["model"], r["seed"], r["fold"]) for r in rows] == [(t.model, t.seed, t.fold) for t in tasks]
    assert all(r["status"] == "ok" for r in rows) and len(calls) == len(tasks)

    tasks = [*_tasks(), Task("dies", False, 1, 1)]
    calls.clear()
    rows = execute(tasks, ctx, 2, lambda: calls.append(1))
    assert len(rows) == len(tasks) and len(calls) == len(tasks), "every training reported, none lost"
    dead = [r for r in rows if r["status"] == "failed"]
    assert any(r["model"] == "dies" for r in dead)
    assert all("worker process died" in r["error"] for r in dead)
    assert [(r["model"], r["seed"], r["fold"]) for r in rows] == [(t.model, t.seed, t.fold) for t in tasks]
