"""Aggregators side by side: the same patient-level CV splits for every model and seed, accuracy and cost.

For every seed the folds are made once (``milcore.data.splits.make_folds``, seeded) and shared by every
model, ours and the torchmil peers alike; every model trains through
:func:`~milcore.training.fold.fit_fold` (same batches, loss, optimiser, epochs, early stopping and
calibration; a torchmil peer is passed as a model factory), so the only difference is the aggregator.
Per run (model x seed x fold) the benchmark records balanced accuracy, macro-F1, AUROC and ECE on the
test part (probabilities temperature-scaled on the validation part, as ``milcore train`` does), the
attention instance-AUROC where ``cells.csv`` ground truth exists, the metrics on a held-out site
(out of distribution: those bags never enter cross-validation) when one is named, training bags/s
(bags seen per second of optimisation, validation passes excluded), inference ms per bag, the peak
memory of the fit and the parameter count.

With ``BenchSpec.tune.trials > 0`` every model is also *tuned* on every outer fold, with the same budget
(:mod:`milcore.bench.tune`: nested patient-level CV inside the fold's training and validation bags), and
its tuned row stands beside its default row.

A run is a :class:`Task`. Tasks are independent (each seeds itself), so they run in worker processes,
one torch thread each, when the machine has cores to spare (``BenchSpec.workers``): the rows are the
same as in one process with one thread. A task that raises is recorded as a failed row naming the
error; the other tasks still run, and the model's summary says ``failed``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from feature_cache.errors import UserError
from milcore.bench import PEER_MODELS, PEER_PREFIX
from milcore.bench.config import BenchSpec
from milcore.metrics import HEADLINE, mean_ci

log = logging.getLogger(__name__)

METRICS = HEADLINE  # recorded per run (test part), and prefixed ood_ on the held-out site
COSTS = ("train_bags_per_s", "infer_ms_per_bag", "peak_mb", "params", "fit_s", "cpu_s")
#: A model's rows: trained with its defaults, or with the settings its own tuning chose.
VARIANTS = ("default", "tuned")


@dataclass(frozen=True)
class Task:
    """One training of the benchmark.

    Attributes:
        model: aggregator name (ours, or the torchmil peer of that name).
        peer: torchmil's implementation.
        seed: split, weight and batching seed.
        fold: index of the outer fold among that seed's folds.
        variant: ``default`` or ``tuned``.
    """

    model: str
    peer: bool
    seed: int
    fold: int
    variant: str = "default"

    @property
    def impl(self) -> str:
        """``milcore`` or ``torchmil``."""
        return "torchmil" if self.peer else "milcore"

    def label(self, folds: int) -> str:
        """``torchmil:abmil seed 0 fold 2/5 (tuned)`` for logs and errors."""
        tuned = " (tuned)" if self.variant == "tuned" else ""
        return f"{PEER_PREFIX if self.peer else ''}{self.model} seed {self.seed} fold {self.fold + 1}/{folds}{tuned}"


def check_models(models: tuple[str, ...], peers: tuple[str, ...]) -> None:
    """Raise :class:`UserError` for an unknown aggregator or peer name, listing the valid ones."""
    from milcore.models.registry import REGISTRY

    REGISTRY.check_names(models, "--models")  # the registry's one-line error, with close matches
    for name in peers:
        if name not in PEER_MODELS:
            raise UserError(f"unknown peer {name!r} (torchmil adapters: {', '.join(PEER_MODELS)})")
    if not models and not peers:
        raise UserError("no model to benchmark (pass --models and/or --peers)")


def _peer(name: str, tm: Any):
    """A factory ``(in_dim, num_classes) -> TorchmilAggregator`` training torchmil's ``name`` through
    :func:`~milcore.training.fold.fit_fold` like any module (seeded before it is built)."""
    from milcore.bench.peers import TorchmilAggregator

    def build(in_dim: int, num_classes: int) -> Any:
        return TorchmilAggregator(name, in_dim, num_classes, tm)

    build.__name__ = f"torchmil_{name}"
    return build


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items() if k in METRICS}


def task_setup(task: Task, ctx: dict[str, Any], params: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The training config and the model (``None``: the registered aggregator) of ``task``.

    ``params`` are settings drawn by the tuner (:func:`milcore.bench.tune.apply_params` splits them into
    training options and aggregator config fields).
    """
    spec: BenchSpec = ctx["spec"]
    config = replace(spec.train, model="abmil" if task.peer else task.model, seed=task.seed)
    if params:
        from milcore.bench.tune import apply_params

        config = apply_params(config, params)
    return config, (_peer(task.model, ctx["tm"]) if task.peer else None)


def fit_and_measure(task: Task, config: Any, model: Any, fold: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """Train ``task`` on its outer fold with :func:`~milcore.training.fold.fit_fold` and measure it; one row."""
    from feature_cache.devices import resolve_device
    from milcore.bench.memory import PeakMemory
    from milcore.metrics import scalar_metrics
    from milcore.metrics.classification import instance_auroc
    from milcore.training.fold import fit_fold

    spec: BenchSpec = ctx["spec"]
    label = task.label(spec.folds)
    cpu0 = time.process_time()
    with PeakMemory(resolve_device(config.device)) as peak:
        result = fit_fold(config, ctx["store"], fold, model=model, desc=label)
    cpu_s = time.process_time() - cpu0
    fit_s = result.seconds["fit"]
    optimise_s = max(fit_s - result.seconds["validate"], 1e-9)  # validation passes excluded
    row: dict[str, Any] = {
        "model": task.model, "impl": task.impl, "variant": task.variant, "seed": task.seed, "fold": fold.index,
        "status": "ok", "n_train": len(fold.train), "n_test": len(fold.test), "epochs_run": len(result.history),
        "best_epoch": result.best_epoch, "temperature": result.temperature, **_prefixed("", result.metrics),
        "train_bags_per_s": len(fold.train) * len(result.history) / optimise_s,
        "infer_ms_per_bag": 1000 * result.seconds["test"] / max(len(fold.test), 1),
        "peak_mb": peak.mb, "params": int(sum(p.numel() for p in result.model.parameters())), "fit_s": fit_s,
        "cpu_s": cpu_s,
    }  # fmt: skip
    truth = ctx["truth"]
    if truth is not None:
        att = {b: a if a.ndim == 1 else a.mean(axis=1) for b, a in zip(fold.test, result.test.attention, strict=True)}
        row["instance_auroc"] = instance_auroc(att, {b: truth[b] for b in fold.test if b in truth})["instance_auroc"]
    if ctx["ood"] is not None:
        ood_store = ctx["ood"]
        with_att = truth is not None
        proba, out = result.predict(ood_store, with_attention=with_att)
        row.update(_prefixed("ood_", scalar_metrics(ood_store.labels, proba)))
        if with_att:
            att = {b: a if a.ndim == 1 else a.mean(axis=1) for b, a in zip(ood_store.bag_ids, out.attention,
                                                                           strict=True)}  # fmt: skip
            row["ood_instance_auroc"] = instance_auroc(att, {b: truth[b] for b in ood_store.bag_ids
                                                             if b in truth})["instance_auroc"]  # fmt: skip
        if ctx.get("keep_ood_predictions"):
            row["ood_proba"] = proba.tolist()
            row["ood_attention"] = [a.tolist() for a in out.attention] if with_att else None
    log.info("%s: balanced accuracy %.3f, AUROC %.3f, %.0f train bags/s, %.2f ms/bag", label,
             row["balanced_accuracy"], row["auroc"], row["train_bags_per_s"], row["infer_ms_per_bag"])  # fmt: skip
    return row


def run_task(task: Task, ctx: dict[str, Any]) -> dict[str, Any]:
    """One benchmark row: tune (``tuned`` variant), train and measure ``task``.

    Any exception is caught and recorded as a ``failed`` row naming it (the traceback goes to the debug
    log), so one broken model never stops the others.
    """
    spec: BenchSpec = ctx["spec"]
    fold = ctx["folds"][task.seed][task.fold]
    try:
        params: dict[str, Any] = {}
        tuning = None
        if task.variant == "tuned":
            from milcore.bench.tune import tune_task

            params, tuning = tune_task(task, fold, ctx)
        config, model = task_setup(task, ctx, params)
        row = fit_and_measure(task, config, model, fold, ctx)
        if tuning is not None:
            row["settings"], row["tuning"] = params, tuning
        return row
    except Exception as exc:  # recorded and reported; the benchmark goes on with the other tasks
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.error("%s failed: %s", task.label(spec.folds), error)
        log.debug("traceback of %s", task.label(spec.folds), exc_info=True)
        return {"model": task.model, "impl": task.impl, "variant": task.variant, "seed": task.seed,
                "fold": fold.index, "status": "failed", "error": error}  # fmt: skip


def _load(spec: BenchSpec) -> dict[str, Any]:
    """Bank, cohort (minus the held-out site), folds per seed, stores and ground truth."""
    from pathlib import Path

    from feature_cache.bank import open_reader
    from milcore.data.cohort import join_bank, read_cohort
    from milcore.data.splits import make_folds
    from milcore.data.store import FeatureStore

    bank = open_reader(spec.bank)
    cohort, join = join_bank(read_cohort(spec.cohort, spec.task, group_column=spec.group_column), bank.bag_ids(),
                           sizes=bank.bag_sizes())
    log.info("%s: %s", spec.cohort, join.summary())
    from milcore.data.inputs import check_trainable

    check_trainable(cohort, spec.bank, spec.folds)  # two classes, enough patients per class, named
    classes = list(cohort.classes)
    ids, labels = list(cohort.bag_ids), np.asarray(cohort.labels)
    groups = np.asarray(cohort.groups) if cohort.groups is not None else None
    ood_ids: list[str] = []
    if spec.ood_site is not None:
        if spec.site_column not in cohort.columns:
            raise UserError(f"{spec.cohort}: no column {spec.site_column!r} for the out-of-distribution site "
                            f"(columns: {', '.join(cohort.columns)})")  # fmt: skip
        site = [str(s) for s in cohort.columns[spec.site_column]]
        held = np.asarray([s == str(spec.ood_site) for s in site])
        if not held.any():
            raise UserError(f"{spec.cohort}: no bag has {spec.site_column} = {spec.ood_site!r} "
                            f"(values: {', '.join(sorted(set(site)))})")  # fmt: skip
        if held.all():
            raise UserError(f"{spec.cohort}: every bag is in site {spec.ood_site!r}; nothing is left to train on")
        ood_ids = [b for b, h in zip(ids, held, strict=True) if h]
        keep = ~held
        ids, labels = [b for b, k in zip(ids, keep, strict=True) if k], labels[keep]
        groups = groups[keep] if groups is not None else None
    folds = {s: make_folds(ids, labels, k=spec.folds, seed=s, groups=groups, classes=classes) for s in spec.seeds}
    class_counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    label_of = dict(zip(cohort.bag_ids, np.asarray(cohort.labels).tolist(), strict=True))
    group_of = dict(zip(ids, groups.tolist() if groups is not None else ids, strict=True))
    from milcore.models import aggregator_needs

    needs_coords = any(aggregator_needs(m).coords for m in spec.models)
    budget = int(spec.train.memory_budget_gb * (1 << 30))
    store = FeatureStore(bank, ids + ood_ids, budget, with_coords=needs_coords,
                         labels=[label_of[b] for b in ids + ood_ids], classes=classes, cohort=cohort)  # fmt: skip
    cells = Path(spec.cells) if spec.cells else Path(spec.cohort).with_name("cells.csv")
    truth = None
    if cells.exists() and "cell_id" in bank.columns:
        from milcore.data.ground_truth import load_cell_truth

        truth = load_cell_truth(cells, bank, ids + ood_ids)
    ood = store.view(ood_ids) if ood_ids else None
    from milcore.data.inputs import bank_fingerprint, labels_fingerprint

    inputs = {"bank_fingerprint": bank_fingerprint(bank, ids + ood_ids),
              "labels_fingerprint": labels_fingerprint(cohort)}  # what a merge of --fold parts compares
    return {"inputs": inputs, "bank": bank, "classes": classes, "folds": folds, "label_of": label_of,
            "group_of": group_of, "store": store, "dim": int(bank.dim), "truth": truth, "ood": ood, "n_bags": len(ids),
            "n_ood": len(ood_ids), "ood_ids": ood_ids, "encoder": bank.info.to_dict(),
            "class_counts": class_counts}  # fmt: skip


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["impl"], row["model"], row.get("variant", "default")


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status", "ok") == "ok"


def _aggregate(mine: list[dict[str, Any]]) -> dict[str, Any]:
    from milcore.metrics import aggregate_folds

    names = [k for k in mine[0] if k in METRICS or (k.startswith("ood_") and not k.endswith(("_proba", "_attention")))
             or k == "instance_auroc" or k in COSTS]  # fmt: skip
    agg = aggregate_folds([{k: float(r[k]) if r.get(k) is not None else math.nan for k in names} for r in mine])
    for k in names:
        agg[k]["ci95"] = mean_ci(agg[k]["values"], method="bootstrap")["ci95"]
    return {"runs": len(mine), "metrics": agg, "params": mine[0]["params"],
            "peak_mb_max": max((r["peak_mb"] or 0.0) for r in mine), "seconds": float(sum(r["fit_s"] for r in mine)),
            "cpu_seconds": float(sum(r["cpu_s"] for r in mine))}  # fmt: skip


def summarize(rows: list[dict[str, Any]], key: tuple[str, ...]) -> dict[str, Any]:
    """Mean ± sd over folds and seeds of one model's runs, with a bootstrap 95% CI of each metric's mean.

    ``key`` is ``(impl, model)`` or ``(impl, model, variant)``. A model with a failed run is summarised
    as ``status: failed`` (with the errors, and the completed runs under ``partial``): a mean over only
    some folds is not comparable with the other models'.
    """
    key = (*key, "default") if len(key) == 2 else tuple(key)
    mine = [r for r in rows if _key(r) == key]
    head = {"impl": key[0], "model": key[1], "variant": key[2]}
    failed = [r for r in mine if not _ok(r)]
    done = [r for r in mine if _ok(r)]
    if failed:
        out = {**head, "status": "failed", "runs": len(mine), "failed_runs": len(failed), "error": failed[0]["error"],
               "failures": [{"seed": r["seed"], "fold": r["fold"], "error": r["error"]} for r in failed]}  # fmt: skip
        if done:
            out["partial"] = _aggregate(done)
        return out
    return {**head, **_aggregate(done)}


def compare_peers(rows: list[dict[str, Any]], metric: str = "balanced_accuracy") -> dict[str, Any]:
    """Ours vs torchmil for every model run by both (default settings): paired differences over (seed, fold),
    speed ratio.

    ``match`` is True when the 95% bootstrap CI of the paired metric difference contains 0.
    """
    rows = [r for r in rows if _ok(r) and r.get("variant", "default") == "default"]
    out: dict[str, Any] = {}
    for name in sorted({r["model"] for r in rows if r["impl"] == "torchmil"}):
        ours = {(r["seed"], r["fold"]): r for r in rows if r["impl"] == "milcore" and r["model"] == name}
        theirs = {(r["seed"], r["fold"]): r for r in rows if r["impl"] == "torchmil" and r["model"] == name}
        pairs = sorted(set(ours) & set(theirs))
        if not pairs:
            continue
        diff = np.asarray([ours[p][metric] - theirs[p][metric] for p in pairs], dtype=float)
        speed = [ours[p]["train_bags_per_s"] / theirs[p]["train_bags_per_s"] for p in pairs]
        o_rate = float(np.median([ours[p]["train_bags_per_s"] for p in pairs]))
        t_rate = float(np.median([theirs[p]["train_bags_per_s"] for p in pairs]))
        lo, hi = mean_ci(diff, method="bootstrap")["ci95"]
        out[name] = {"metric": metric, "pairs": len(pairs), "difference_mean": float(np.nanmean(diff)),
                     "difference_ci95": [lo, hi], "match": bool(lo <= 0 <= hi) if math.isfinite(lo) else None,
                     "train_bags_per_s_ours": o_rate, "train_bags_per_s_theirs": t_rate,
                     "speed_ratio": o_rate / t_rate,
                     "speed_ratio_median_of_pairs": float(np.median(speed))}  # fmt: skip
    return out


def bench_warnings(rows: list[dict[str, Any]], summary: list[dict[str, Any]], class_counts: dict[str, int],
                   folds: int) -> list[dict[str, Any]]:  # fmt: skip
    """What makes a benchmark's numbers unfit to rank models (``bench.json["warnings"]``).

    Per model: the 95% CI of its mean balanced accuracy or AUROC over folds x seeds includes chance (or
    lies below it), the same on the held-out site, and fitted temperatures at a bound of their search
    range; a model with failed runs; for the cohort: classes smaller than the folds or than the
    small-class minimum. The rules are those of :mod:`milcore.report.caveats`; each per-model warning
    names its ``model`` and ``impl`` (and ``variant``).
    """
    from milcore.bench.report import model_label
    from milcore.report.caveats import chance_classes, class_size_warnings, headline_warnings, temperature_warnings

    present = chance_classes(list(class_counts.values()), len(class_counts))
    out = class_size_warnings(class_counts, folds)
    for s in summary:
        label = model_label(s)
        tag = {"model": s["model"], "impl": s["impl"], **({"variant": s["variant"]} if "variant" in s else {})}
        if s.get("status") == "failed":
            out.append({"code": "failed", "severity": "error", **tag,
                        "message": f"Model {label} failed on {s['failed_runs']} of {s['runs']} runs ({s['error']}); "
                                   "its row is not comparable"})  # fmt: skip
            continue
        if "metrics" not in s:
            continue
        m = s["metrics"]
        for prefix, where in (("", ""), ("ood_", " on the held-out site")):
            entries = {k: {"value": m[prefix + k]["mean"], "ci95": m[prefix + k].get("ci95")}
                       for k in ("balanced_accuracy", "auroc") if prefix + k in m}  # fmt: skip
            found = headline_warnings(entries, present, subject=f"Model {label}{where}", **tag,
                                      **({"scope": "ood"} if prefix else {}))  # fmt: skip
            out += [w for w in found if w["code"] != "no_ci" or not prefix]
        mine = [r for r in rows if _key(r) == (s["impl"], s["model"], s.get("variant", "default")) and _ok(r)]
        where = [f"{label} seed {r['seed']} fold {r['fold'] + 1}/{folds}" for r in mine]
        out += temperature_warnings([r["temperature"] for r in mine], where, **tag)
    return out


def plan_tasks(spec: BenchSpec, with_peers: bool, n_folds: dict[int, int]) -> list[Task]:
    """Every (seed, fold, model[, tuned]) of ``spec``, seed by seed, fold by fold, ours then the peers
    (only fold ``spec.fold`` of each seed when it is set)."""
    models = [(m, False) for m in spec.models] + ([(m, True) for m in spec.peers] if with_peers else [])
    variants = VARIANTS if spec.tune.trials > 0 else VARIANTS[:1]
    return [Task(m, peer, seed, f, v) for seed in spec.seeds for f in range(n_folds[seed]) for m, peer in models
            for v in variants if spec.fold is None or f == spec.fold]  # fmt: skip


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(spec: BenchSpec, n_tasks: int, store: Any) -> tuple[int, str]:
    """Worker processes for ``n_tasks`` trainings, and why.

    ``spec.workers`` (0: one per available core), never more than the tasks; one (this process) on a
    GPU, where ``fork`` is unavailable (it shares the loaded bags with the workers at no cost), and
    when the bags are streamed from the bank rather than held in memory.
    """
    import multiprocessing

    from feature_cache.devices import resolve_device

    wanted = spec.workers or available_cores()
    if wanted <= 1 or n_tasks <= 1:
        return 1, "one process"
    if resolve_device(spec.train.device).type != "cpu":
        return 1, "one process (training on a GPU)"
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return 1, "one process (no fork on this platform)"
    if not store.in_memory:
        return 1, "one process (the bags are streamed from the bank)"
    return min(wanted, n_tasks), "worker processes"


#: What forked workers inherit from the benchmark process: the loaded context (bags in memory, folds,
#: ground truth) and their torch thread count. Set just before the pool forks; read by the workers.
_WORKER: dict[str, Any] = {}


def _init_worker() -> None:
    import torch

    from feature_cache.progress import set_quiet

    torch.set_num_threads(_WORKER["threads"])
    set_quiet(True)  # the parent counts trainings; per-epoch bars of several workers would interleave
    store = _WORKER["ctx"]["store"]
    for start in range(0, len(store), 64):  # map the shared bags once, so no fit's peak memory counts them
        store.gather(np.arange(start, min(start + 64, len(store))))


def _work(index: int, task: Task) -> tuple[int, dict[str, Any]]:
    return index, run_task(task, _WORKER["ctx"])


class LongestFirst:
    """Which pending training to start next: longest expected first (the LPT rule), so the pool ends on short
    trainings instead of one worker finishing a long one alone.

    The expected length of a training is the mean CPU seconds of the finished trainings of the same model,
    implementation and variant; kinds not yet seen go first (in task order), which also measures every kind
    early. Tuned trainings go before every default one (they are the longest by far).
    """

    def __init__(self, tasks: list[Task]) -> None:
        self.tasks = tasks
        self.pending = list(range(len(tasks)))
        self.seconds: dict[tuple[str, str, str], list[float]] = {}

    @staticmethod
    def _kind(task: Task) -> tuple[str, str, str]:
        return task.model, task.impl, task.variant

    def _expected(self, i: int) -> tuple[bool, float]:
        task = self.tasks[i]
        seen = self.seconds.get(self._kind(task))
        return task.variant == "tuned", math.inf if not seen else sum(seen) / len(seen)

    def next(self) -> int | None:
        """The index of the task to start now, or ``None`` when none is left."""
        if not self.pending:
            return None
        best = max(self.pending, key=self._expected)  # the first of equals: task order among unseen kinds
        self.pending.remove(best)
        return best

    def finished(self, i: int, row: dict[str, Any]) -> None:
        """Record a finished training's CPU seconds (failed ones carry none)."""
        if isinstance(row.get("cpu_s"), int | float):
            self.seconds.setdefault(self._kind(self.tasks[i]), []).append(float(row["cpu_s"]))


def execute(tasks: list[Task], ctx: dict[str, Any], workers: int, done: Callable[[], None]) -> list[dict[str, Any]]:
    """Run ``tasks`` (in ``workers`` forked processes when > 1, longest expected first: :class:`LongestFirst`)
    and return their rows in task order."""
    if workers <= 1:
        rows = []
        for task in tasks:
            rows.append(run_task(task, ctx))
            done()
        return rows
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    import torch

    ctx["store"].gather(np.arange(min(1, len(ctx["store"]))))  # read the bags once, before the fork shares them
    _WORKER.update(ctx=ctx, threads=max(1, torch.get_num_threads() // workers))
    schedule = LongestFirst(tasks)
    rows: list[dict[str, Any] | None] = [None] * len(tasks)
    spec: BenchSpec = ctx["spec"]
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_init_worker) as pool:  # fmt: skip
            running: dict[Any, int] = {}

            def died(i: int, exc: BaseException) -> None:  # a worker died (killed, out of memory): its tasks fail
                task = tasks[i]
                rows[i] = {"model": task.model, "impl": task.impl, "variant": task.variant, "seed": task.seed,
                           "fold": task.fold, "status": "failed",
                           "error": f"worker process died ({type(exc).__name__})"}  # fmt: skip
                log.error("%s failed: its worker process died", task.label(spec.folds))
                done()

            def submit() -> None:  # keep one task queued beyond the busy workers, so none waits for the choice
                while len(running) < workers + 1 and (i := schedule.next()) is not None:
                    try:
                        running[pool.submit(_work, i, tasks[i])] = i
                    except BrokenProcessPool as exc:  # the pool is gone: every task not yet run fails
                        died(i, exc)

            submit()
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = running.pop(future)
                    try:
                        _, rows[i] = future.result()
                    except BrokenProcessPool as exc:
                        died(i, exc)
                        continue
                    schedule.finished(i, rows[i])
                    done()
                submit()
    finally:
        _WORKER.clear()
    return [r for r in rows if r is not None]


def run_benchmark(spec: BenchSpec) -> dict[str, Any]:
    """Run every (seed, fold, model) of ``spec``; returns the ``bench.json`` payload (without plots).

    The size of the job (models x folds x seeds trainings) is logged before the first training, and the
    expected duration once the first training is measured; a progress display counts trainings.

    With ``spec.fold`` set, only that outer fold of every seed is run (one task of a job array): the
    payload records the whole spec (with ``fold``), the fingerprints of the bank and labels (``inputs``)
    and every fold's split assignment, so :func:`milcore.bench.merge.merge_benches` can check and join
    the parts into the payload of the whole benchmark.

    Raises:
        InvalidArgumentError: ``spec.fold`` outside ``0 .. spec.folds - 1`` (before anything is read).
    """
    import resource

    from feature_cache.progress import WorkEstimate, progress
    from milcore.bench.config import check_fold, expand_models
    from milcore.bench.peers import import_torchmil
    from milcore.report.bench_io import machine_info
    from milcore.report.document import plural

    check_fold(spec)
    spec = spec.replace(models=expand_models(spec.models))  # '*' (the default): every registered aggregator
    check_models(spec.models, spec.peers)
    if spec.tune.trials:
        from milcore.bench.tune import check_tune_spec

        check_tune_spec(spec)  # every --search option inside the models' declared spaces, before any work
    t0, cpu0 = time.perf_counter(), time.process_time()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = _load_average()
    tm = import_torchmil() if spec.peers else None
    ctx = {"spec": spec, "tm": tm, **_load(spec)}
    tasks = plan_tasks(spec, tm is not None, {s: len(f) for s, f in ctx["folds"].items()})
    workers, how = resolve_workers(spec, len(tasks), ctx["store"])
    n_models = len(spec.models) + (len(spec.peers) if tm is not None else 0)
    n_peers = len(spec.peers) if tm is not None else 0
    models = plural(n_models, "model") + (f" ({n_peers} torchmil)" if n_peers else "")
    tuned = f", each also tuned ({spec.tune.trials} trials)" if spec.tune.trials else ""
    folds = plural(spec.folds, "fold") if spec.fold is None else f"fold {spec.fold} of {spec.folds}"
    plan_text = f"bench: {models}{tuned} x {folds} x {plural(len(spec.seeds), 'seed')}"
    detail = (f" of up to {plural(spec.train.epochs, 'epoch')} each, on {plural(ctx['n_bags'], 'bag')}, "
              f"{workers} {how}")  # fmt: skip
    estimate = WorkEstimate(len(tasks), "training", plan_text, detail)
    estimate.start()
    bar = progress(total=len(tasks), desc="bench", unit="training")

    def done() -> None:
        estimate.done()
        bar.update(1)

    rows = execute(tasks, ctx, workers, done)
    bar.close()
    derived = summarize_runs(rows, spec, ctx["class_counts"], peers_installed=tm is not None)
    from milcore.report.caveats import log_warnings

    log_warnings(log, derived["warnings"])
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    children_cpu = (children.ru_utime + children.ru_stime) - (children0.ru_utime + children0.ru_stime)
    result = {
        "benchmark": "aggregators", "spec": spec.to_dict(), "classes": ctx["classes"], "bags": ctx["n_bags"],
        "inputs": ctx["inputs"], "ood_bags": ctx["n_ood"], "encoder": ctx["encoder"],
        "instance_ground_truth": ctx["truth"] is not None,
        "torchmil": _torchmil_version() if tm is not None else ("not installed" if spec.peers else "not requested"),
        "machine": machine_info(), "torch_threads": _threads(), "workers": workers,
        "precision": _precision(spec), "runs": rows, "summary": derived["summary"], "peers": derived["peers"],
        "splits": {str(s): [asdict(f) for f in fs] for s, fs in ctx["folds"].items()},
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0 + children_cpu,
        "load_average_before": load_before, "load_average_after": _load_average(),
        "class_counts": ctx["class_counts"], "warnings": derived["warnings"], "failed": derived["failed"],
    }  # fmt: skip
    if "tuning" in derived:
        result["tuning"] = derived["tuning"]
    if ctx["ood_ids"]:
        result["ood_bag_ids"] = ctx["ood_ids"]
    return result


def summarize_runs(rows: list[dict[str, Any]], spec: BenchSpec, class_counts: dict[str, int], *,
                   peers_installed: bool) -> dict[str, Any]:  # fmt: skip
    """What ``bench.json`` derives from its runs: ``summary``, ``warnings``, ``peers``, ``failed`` (and ``tuning``).

    Used by :func:`run_benchmark` and by :func:`milcore.bench.merge.merge_benches`, so a benchmark joined
    from the parts of a job array is summarised exactly as the one run in a single process.
    """
    keys = list(dict.fromkeys(_key(r) for r in rows))
    summary = [summarize(rows, k) for k in keys]
    warnings = bench_warnings(rows, summary, class_counts, spec.folds)
    summary += [{"impl": "torchmil", "model": m, "status": "not installed"} for m in spec.peers if not peers_installed]
    out = {"summary": summary, "peers": compare_peers(rows), "warnings": warnings,
           "failed": [f"{s['impl']}:{s['model']}:{s['variant']}" for s in summary if s.get("status") == "failed"]}
    if spec.tune.trials:
        from milcore.bench.tune import compare_tuning, tuning_budget

        out["tuning"] = {"budget": tuning_budget(spec), "comparison": compare_tuning(rows)}
    return out


def _precision(spec: BenchSpec) -> str:
    """The compute precision the runs trained and predicted in (``TrainConfig.amp`` resolved here)."""
    from feature_cache.devices import resolve_device
    from milcore.training.loop import autocast_dtype

    dtype = autocast_dtype(spec.train.amp, resolve_device(spec.train.device))
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast (amp={spec.train.amp})"


def _torchmil_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchmil")
    except PackageNotFoundError:
        return "unknown"


def _load_average() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def _threads() -> int:
    import torch

    return torch.get_num_threads()
