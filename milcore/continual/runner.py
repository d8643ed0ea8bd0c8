"""Run strategies over a task stream: train task after task, evaluate every task, save resumable state.

Layout of a run folder ``OUT``::

    OUT/config.yaml                     the resolved configuration
    OUT/scenario.json                   tasks, classes, bag counts
    OUT/data/                           prepared bank + cohort (synthetic recipes only)
    OUT/streams/<strategy>/seed<k>/     state.pt (after each task), memory.npz, result.json
    OUT/continual.json                  strategy -> metrics (mean over seeds, and per seed)
    OUT/report.html, report.md          the summary with plots

``--resume`` continues every unfinished stream from its last completed task (weights, strategy state,
exemplar memory -- checked against the bank -- and the accuracy matrix so far) and skips finished ones.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feature_cache.config import read_yaml
from feature_cache.devices import resolve_device
from feature_cache.errors import InvalidArgumentError, OutputExistsError, UserError
from feature_cache.progress import WorkEstimate, progress
from milcore.continual.config import ContinualConfig, StrategyConfig
from milcore.continual.data import BagData, infer
from milcore.continual.memory import ExemplarMemory, group_budgets
from milcore.continual.metrics import per_class_recall, summarize, task_balanced_accuracy
from milcore.continual.scenarios import Scenario, build_scenario, restrict_classes
from milcore.continual.strategies import StrategyContext
from milcore.continual.train import train_task
from milcore.report.files import write_json_atomic

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer",
                "final_balanced_accuracy")  # fmt: skip


def make_strategy(name: str, options: StrategyConfig | dict[str, Any]) -> Any:
    """The configured strategy ``name`` (an entry may name its registered strategy with ``strategy:``).

    Variants then run side by side, e.g. ``milreplay_ranked: {strategy: milreplay, random_share: 0.0}``.
    """
    spec = options if isinstance(options, StrategyConfig) else StrategyConfig.from_dict(options, where=name)
    return spec.create(name)


def evaluate(model: torch.nn.Module, data: BagData, scenario: Scenario, seen: int) -> np.ndarray:
    """(T,) balanced accuracy of each task's test bags, predicting among the ``seen`` classes (NaN: unseen)."""
    column = np.full(scenario.num_tasks, np.nan)
    for i, task in enumerate(scenario.tasks):
        if max(task.classes) >= seen:
            continue
        logits = infer(model, data, task.test_ids).logits[:, :seen]
        column[i] = task_balanced_accuracy(task.test_labels, logits.argmax(1), task.classes)
    return column


class StreamRunner:
    """Runs every (strategy, seed) stream of one configuration into one folder.

    Args:
        config: the validated configuration.
        out: the run folder.
        resume: continue unfinished streams (else the folder must not hold a run yet).
    """

    def __init__(self, config: ContinualConfig, out: str | Path, resume: bool = False) -> None:
        self.config, self.out, self.resume = config, Path(out), resume
        self.device = resolve_device(config.train.device)

    def prepare(self) -> tuple[Any, Scenario]:
        """Open the bank, read the cohort, build the scenario (writes config.yaml, scenario.json)."""
        import yaml

        from feature_cache.bank import open_reader
        from milcore.continual.prepare import prepare_data
        from milcore.data.cohort import join_bank, read_cohort

        started = (self.out / "streams").exists() or (self.out / "continual.json").exists()
        if started and not self.resume:
            raise OutputExistsError(f"{self.out}: holds a continual run already; pass --resume to continue it "
                                    f"or choose another --out")  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        if started and (self.out / "config.yaml").exists():
            self._check_same_config(read_yaml(self.out / "config.yaml", what="recorded configuration"))
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        bank_path, cohort_path = prepare_data(self.config.data, self.out)
        bank = open_reader(bank_path)
        spec = self.config.scenario
        classes = spec.stream_classes() or self.config.data.classes
        label = self.config.data.label
        cohort = read_cohort(cohort_path, label)
        if classes:  # the stream's classes, in order; bags of other classes are not used
            cohort = restrict_classes(cohort, [str(c) for c in classes])
        cohort, _ = join_bank(cohort, bank.bag_ids(), strict=True, sizes=bank.bag_sizes())
        scenario = build_scenario(cohort, spec, seed=spec.seed)
        write_json_atomic(self.out / "scenario.json", scenario.describe())
        groups = sum(len(t.classes) for t in scenario.tasks)
        if any(make_strategy(n, o).uses_memory for n, o in self.config.strategies.items()):
            try:
                group_budgets(self.config.budget, groups)
            except InvalidArgumentError as exc:
                raise UserError(f"{self.config.name}: {exc}") from exc
        return bank, scenario

    def _check_same_config(self, saved: dict[str, Any]) -> None:
        """On resume, everything but the seeds and the strategy list must match the saved run."""
        try:
            old = ContinualConfig.from_dict(saved, where=str(self.out / "config.yaml"))
        except UserError as exc:
            raise UserError(f"{exc}; cannot check what --resume would continue") from None
        keys = ("data", "scenario", "model", "model_args", "train", "memory")
        changed = [k for k in keys if getattr(old, k) != getattr(self.config, k)]
        changed += [n for n, o in self.config.strategies.items() if n in old.strategies and old.strategies[n] != o]
        if changed:
            raise UserError(f"{self.out}: the configuration differs from the run being resumed "
                            f"({', '.join(changed)}); use another --out")  # fmt: skip

    def run(self, strategies: list[str] | None = None) -> dict[str, Any]:
        """Run (or resume) every stream; write continual.json and the report; returns the summary."""
        from milcore.continual.report import write_report

        bank, scenario = self.prepare()
        names = strategies or list(self.config.strategies)
        unknown = [n for n in names if n not in self.config.strategies]
        if unknown:
            raise UserError(f"strategies not in the configuration: {', '.join(unknown)} "
                            f"(configured: {', '.join(self.config.strategies)})")  # fmt: skip
        data = BagData(bank)
        if self.config.train.standardize:
            data.standardize(scenario.tasks[0].train_ids)
        t0 = time.perf_counter()
        results: dict[str, dict[int, dict[str, Any]]] = {}
        estimate = self.size_estimate(names, scenario)
        estimate.start()
        bar = progress(total=estimate.total, desc="continual", unit="task")
        for name in names:
            for seed in self.config.seeds:
                results.setdefault(name, {})[seed] = self.run_stream(name, seed, scenario, data, bar, estimate)
        bar.close()
        summary = {name: aggregate(per_seed, scenario) for name, per_seed in results.items()}
        write_json_atomic(self.out / "continual.json", summary)
        write_json_atomic(self.out / "run.json", {"config": self.config.to_dict(), "scenario": scenario.describe(),
                                             "device": str(self.device), "seconds": time.perf_counter() - t0,
                                             "bank": str(bank.path), "encoder": bank.info.to_dict()})  # fmt: skip
        html, md = write_report(self.out, self.config, scenario, summary)
        log.info("wrote %s, %s and %s", self.out / "continual.json", html, md)
        bank.close()
        return summary

    def size_estimate(self, names: list[str], scenario: Scenario) -> WorkEstimate:
        """The job's size: strategies x seeds x tasks task trainings, their epochs and bags (logged by ``start``)."""
        tasks = scenario.describe()["tasks"]
        bags = sum(int(t["train_bags"]) for t in tasks)
        n, s, t = len(names), len(self.config.seeds), scenario.num_tasks
        plan = (f"continual: {n} strateg{'y' if n == 1 else 'ies'} x {s} seed{'s' * (s != 1)} x "
                f"{t} task{'s' * (t != 1)}")  # fmt: skip
        epochs = self.config.train.epochs
        detail = (f" of {epochs} epoch{'s' * (epochs != 1)} each ({n * s * t * epochs} epochs in all), on {bags} "
                  f"training bags per stream plus the memory's replayed bags")  # fmt: skip
        return WorkEstimate(n * s * t, "task training", plan, detail)

    def run_stream(self, name: str, seed: int, scenario: Scenario, data: BagData, bar: Any = None,
                   estimate: WorkEstimate | None = None) -> dict[str, Any]:  # fmt: skip
        """Train one strategy over the stream with one seed (resuming from its saved state)."""
        from milcore.models import create_aggregator

        folder = self.out / "streams" / name / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        result_path, state_path = folder / "result.json", folder / "state.pt"
        if result_path.exists():
            if bar is not None:
                bar.update(scenario.num_tasks)
            if estimate is not None:
                estimate.skip(scenario.num_tasks)
            return json.loads(result_path.read_text())
        cfg = self.config
        strategy = cfg.strategies[name].create(name)
        torch.manual_seed(seed)
        model = create_aggregator(cfg.model, in_dim=data.dim, num_classes=max(2, scenario.seen_classes(0)),
                                  **cfg.model_args).to(self.device)  # fmt: skip
        memory = ExemplarMemory(cfg.budget, cfg.per_bag) if strategy.uses_memory else None
        t = scenario.num_tasks
        r = np.full((t, t), np.nan)
        baseline = evaluate(model, data, scenario, max(2, scenario.seen_classes(0)))
        start, seconds, losses = 0, 0.0, []
        if state_path.exists():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            model.reset_head(int(state["head"]))
            model.load_state_dict(state["model"])
            model.to(self.device)
            strategy.load_state_dict(state["strategy"])
            if state["memory"] is not None:
                memory = ExemplarMemory.from_state(state["memory"])
                memory.validate(data.bank)
            r, baseline = np.asarray(state["r"], dtype=float), np.asarray(state["baseline"], dtype=float)
            start, seconds, losses = int(state["next_task"]), float(state["seconds"]), list(state["losses"])
            log.info("resuming %s seed %d at task %d of %d", name, seed, start, t)
            if bar is not None:
                bar.update(start)
            if estimate is not None:
                estimate.skip(start)
        for j in range(start, t):
            t0 = time.perf_counter()
            seen = scenario.seen_classes(j)
            torch.manual_seed(seed * 1_000 + j)  # new head rows drawn alike in a straight and a resumed run
            if model.num_classes < max(2, seen):
                model.reset_head(max(2, seen))
            ctx = StrategyContext(j, scenario, data, model, memory, seen, self.device, seed)
            strategy.before_task(ctx)
            items = strategy.train_items(ctx)
            losses.append(train_task(ctx, strategy, items, cfg.train))
            strategy.after_task(ctx)
            r[:, j] = evaluate(model, data, scenario, seen)
            seconds += time.perf_counter() - t0
            log.debug("%s seed %d task %d: R[:, %d] = %s", name, seed, j, j, np.round(r[:, j], 3))
            payload = {
                "next_task": j + 1, "head": int(model.num_classes), "model": model.state_dict(),
                "strategy": strategy.state_dict(), "memory": None if memory is None else memory.to_state(),
                "r": r.tolist(), "baseline": baseline.tolist(), "seconds": seconds, "losses": losses,
            }  # fmt: skip
            tmp = state_path.with_name(state_path.name + ".tmp")
            torch.save(payload, tmp)
            tmp.replace(state_path)
            if memory is not None:
                memory.save(folder / "memory.npz")
            if bar is not None:
                bar.update(1)
            if estimate is not None:
                estimate.done()
        result = summarize(r, baseline)
        seen = scenario.seen_classes(t - 1)
        ids = [b for task in scenario.tasks for b in task.test_ids]
        y = np.concatenate([task.test_labels for task in scenario.tasks])
        pred = infer(model, data, ids).logits[:, :seen].argmax(1)
        recalls = per_class_recall(y, pred, len(scenario.classes))
        result.update({
            "final_balanced_accuracy": float(np.nanmean(recalls)),
            "per_class_balanced_accuracy": dict(zip(scenario.classes, recalls, strict=True)),
            "memory_instances": None if memory is None else memory.num_instances,
            "memory_bags": None if memory is None else len(memory),
            "seconds": seconds, "epoch_losses": losses,
        })  # fmt: skip
        write_json_atomic(result_path, result)
        return result


def aggregate(per_seed: dict[int, dict[str, Any]], scenario: Scenario) -> dict[str, Any]:
    """Mean (and standard deviation) over seeds of one strategy's stream metrics."""
    seeds = sorted(per_seed)
    out: dict[str, Any] = {"seeds": seeds}
    for key in SUMMARY_KEYS:
        values = [per_seed[s][key] for s in seeds]
        if any(v is None for v in values):
            out[key], out[f"{key}_std"] = None, None
        else:
            out[key], out[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    mats = np.asarray([[[np.nan if v is None else v for v in row] for row in per_seed[s]["accuracy_matrix"]]
                       for s in seeds], dtype=float)  # fmt: skip
    with warnings.catch_warnings():  # all-NaN cells (a task before its classes arrive) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(mats, axis=0)
    out["accuracy_matrix"] = [[None if not np.isfinite(v) else float(v) for v in row] for row in mean]
    out["accuracy_curve"] = np.mean([per_seed[s]["accuracy_curve"] for s in seeds], axis=0).tolist()
    out["per_class_balanced_accuracy"] = {
        c: float(np.nanmean([per_seed[s]["per_class_balanced_accuracy"][c] for s in seeds])) for c in scenario.classes
    }
    out["memory_instances"] = per_seed[seeds[0]]["memory_instances"]
    out["seconds"] = float(np.sum([per_seed[s]["seconds"] for s in seeds]))
    out["per_seed"] = {str(s): {k: per_seed[s][k] for k in SUMMARY_KEYS} for s in seeds}
    return out


def run_continual(config: ContinualConfig, out: str | Path, *, resume: bool = False,
                  strategies: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run a continual configuration into ``out`` (see :class:`StreamRunner`)."""
    return StreamRunner(config, out, resume).run(strategies)
