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
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from feature_cache.errors import UserError
from milcore.bench import PEER_MODELS, PEER_PREFIX
from milcore.bench.config import BenchSpec
from milcore.metrics import HEADLINE, mean_ci

log = logging.getLogger(__name__)

METRICS = HEADLINE  # recorded per run (test part), and prefixed ood_ on the held-out site
COSTS = ("train_bags_per_s", "infer_ms_per_bag", "peak_mb", "params", "fit_s", "cpu_s")


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


def run_one(name: str, peer: bool, seed: int, fold: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """Train ``name`` on one fold of one seed with :func:`~milcore.training.fold.fit_fold` and measure it;
    returns one result row."""
    from feature_cache.devices import resolve_device
    from milcore.bench.memory import PeakMemory
    from milcore.metrics import scalar_metrics
    from milcore.metrics.classification import instance_auroc
    from milcore.training.fold import fit_fold

    spec: BenchSpec = ctx["spec"]
    config = replace(spec.train, model="abmil" if peer else name, seed=seed)
    label = f"{PEER_PREFIX if peer else ''}{name} seed {seed} fold {fold.index + 1}/{spec.folds}"
    cpu0 = time.process_time()
    with PeakMemory(resolve_device(config.device)) as peak:
        result = fit_fold(config, ctx["store"], fold, model=_peer(name, ctx["tm"]) if peer else None, desc=label)
    cpu_s = time.process_time() - cpu0
    fit_s = result.seconds["fit"]
    optimise_s = max(fit_s - result.seconds["validate"], 1e-9)  # validation passes excluded
    row: dict[str, Any] = {
        "model": name, "impl": "torchmil" if peer else "milcore", "seed": seed, "fold": fold.index,
        "n_train": len(fold.train), "n_test": len(fold.test), "epochs_run": len(result.history),
        "best_epoch": result.best_epoch, "temperature": result.temperature, **_prefixed("", result.metrics),
        "train_bags_per_s": len(fold.train) * len(result.history) / optimise_s,
        "infer_ms_per_bag": 1000 * result.seconds["test"] / max(len(fold.test), 1),
        "peak_mb": peak.mb, "params": int(sum(p.numel() for p in result.model.parameters())), "fit_s": fit_s,
        "cpu_s": cpu_s,
    }  # fmt: skip
    truth = ctx["truth"]
    if truth is not None:
        att = {b: a if a.ndim == 1 else a.mean(axis=1) for b, a in zip(fold.test, result.test.attention, strict=True)}
        row["instance_auroc"] = instance_auroc(att, {b: truth[b] for b in fold.test})["instance_auroc"]
    if ctx["ood"] is not None:
        ood_store = ctx["ood"]
        proba, _ = result.predict(ood_store, with_attention=False)
        row.update(_prefixed("ood_", scalar_metrics(ood_store.labels, proba)))
    log.info("%s: balanced accuracy %.3f, AUROC %.3f, %.0f train bags/s, %.2f ms/bag", label,
             row["balanced_accuracy"], row["auroc"], row["train_bags_per_s"], row["infer_ms_per_bag"])  # fmt: skip
    return row


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
    from milcore.models import aggregator_needs

    needs_coords = any(aggregator_needs(m).coords for m in spec.models)
    budget = int(spec.train.memory_budget_gb * (1 << 30))
    store = FeatureStore(bank, ids + ood_ids, budget, with_coords=needs_coords,
                         labels=[label_of[b] for b in ids + ood_ids], classes=classes, cohort=cohort)  # fmt: skip
    cells = Path(spec.cells) if spec.cells else Path(spec.cohort).with_name("cells.csv")
    truth = None
    if cells.exists() and "cell_id" in bank.columns:
        from milcore.data.ground_truth import load_cell_truth

        truth = load_cell_truth(cells, bank, ids)
    ood = store.view(ood_ids) if ood_ids else None
    return {"bank": bank, "classes": classes, "folds": folds, "label_of": label_of, "store": store,
            "dim": int(bank.dim), "truth": truth, "ood": ood, "n_bags": len(ids), "n_ood": len(ood_ids),
            "encoder": bank.info.to_dict(), "class_counts": class_counts}  # fmt: skip


def summarize(rows: list[dict[str, Any]], key: tuple[str, str]) -> dict[str, Any]:
    """Mean ± sd over folds and seeds of one model's runs, with a bootstrap 95% CI of each metric's mean."""
    from milcore.metrics import aggregate_folds

    mine = [r for r in rows if (r["impl"], r["model"]) == key]
    names = [k for k in mine[0] if k in METRICS or k.startswith("ood_") or k == "instance_auroc" or k in COSTS]
    agg = aggregate_folds([{k: float(r[k]) if r[k] is not None else math.nan for k in names} for r in mine])
    for k in names:
        agg[k]["ci95"] = mean_ci(agg[k]["values"], method="bootstrap")["ci95"]
    return {"impl": key[0], "model": key[1], "runs": len(mine), "metrics": agg,
            "params": mine[0]["params"], "peak_mb_max": max((r["peak_mb"] or 0.0) for r in mine),
            "seconds": float(sum(r["fit_s"] for r in mine)),
            "cpu_seconds": float(sum(r["cpu_s"] for r in mine))}  # fmt: skip


def compare_peers(rows: list[dict[str, Any]], metric: str = "balanced_accuracy") -> dict[str, Any]:
    """Ours vs torchmil for every model run by both: paired differences over (seed, fold), speed ratio.

    ``match`` is True when the 95% bootstrap CI of the paired metric difference contains 0.
    """
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
    range; for the cohort: classes smaller than the folds or than the small-class minimum. The rules are
    those of :mod:`milcore.report.caveats`; each per-model warning names its ``model`` and ``impl``.
    """
    from milcore.bench.report import model_label
    from milcore.report.caveats import chance_classes, class_size_warnings, headline_warnings, temperature_warnings

    present = chance_classes(list(class_counts.values()), len(class_counts))
    out = class_size_warnings(class_counts, folds)
    for s in summary:
        if "metrics" not in s:
            continue
        label, tag = model_label(s), {"model": s["model"], "impl": s["impl"]}
        m = s["metrics"]
        for prefix, where in (("", ""), ("ood_", " on the held-out site")):
            entries = {k: {"value": m[prefix + k]["mean"], "ci95": m[prefix + k].get("ci95")}
                       for k in ("balanced_accuracy", "auroc") if prefix + k in m}  # fmt: skip
            found = headline_warnings(entries, present, subject=f"Model {label}{where}", **tag,
                                      **({"scope": "ood"} if prefix else {}))  # fmt: skip
            out += [w for w in found if w["code"] != "no_ci" or not prefix]
        mine = [r for r in rows if (r["impl"], r["model"]) == (s["impl"], s["model"])]
        where = [f"{label} seed {r['seed']} fold {r['fold'] + 1}/{folds}" for r in mine]
        out += temperature_warnings([r["temperature"] for r in mine], where, **tag)
    return out


def run_benchmark(spec: BenchSpec) -> dict[str, Any]:
    """Run every (seed, fold, model) of ``spec``; returns the ``bench.json`` payload (without plots).

    The size of the job (models x folds x seeds trainings) is logged before the first training, and the
    expected duration once the first training is measured; a progress display counts trainings.
    """
    from feature_cache.progress import WorkEstimate, progress
    from milcore.bench.peers import import_torchmil
    from milcore.report.bench_io import machine_info
    from milcore.report.document import plural

    check_models(spec.models, spec.peers)
    t0, cpu0 = time.perf_counter(), time.process_time()
    tm = import_torchmil() if spec.peers else None
    ctx = {"spec": spec, "tm": tm, **_load(spec)}
    plan = [(m, False) for m in spec.models] + ([(m, True) for m in spec.peers] if tm is not None else [])
    total = len(plan) * sum(len(ctx["folds"][s]) for s in spec.seeds)
    n_peers = sum(1 for _, peer in plan if peer)
    models = plural(len(plan), "model") + (f" ({n_peers} torchmil)" if n_peers else "")
    plan_text = f"bench: {models} x {plural(spec.folds, 'fold')} x {plural(len(spec.seeds), 'seed')}"
    detail = f" of up to {plural(spec.train.epochs, 'epoch')} each, on {plural(ctx['n_bags'], 'bag')}"
    estimate = WorkEstimate(total, "training", plan_text, detail)
    estimate.start()
    bar = progress(total=total, desc="bench", unit="training")
    rows: list[dict[str, Any]] = []
    for seed in spec.seeds:  # all models see the same folds of a seed, one after the other
        for fold in ctx["folds"][seed]:
            for name, peer in plan:
                rows.append(run_one(name, peer, seed, fold, ctx))
                estimate.done()
                bar.update(1)
    bar.close()
    keys = list(dict.fromkeys((r["impl"], r["model"]) for r in rows))
    summary = [summarize(rows, k) for k in keys]
    warnings = bench_warnings(rows, summary, ctx["class_counts"], spec.folds)
    from milcore.report.caveats import log_warnings

    log_warnings(log, warnings)
    summary += [{"impl": "torchmil", "model": m, "status": "not installed"} for m in spec.peers if tm is None]
    return {
        "benchmark": "aggregators", "spec": spec.to_dict(), "classes": ctx["classes"], "bags": ctx["n_bags"],
        "ood_bags": ctx["n_ood"], "encoder": ctx["encoder"], "instance_ground_truth": ctx["truth"] is not None,
        "torchmil": _torchmil_version() if tm is not None else ("not installed" if spec.peers else "not requested"),
        "machine": machine_info(), "torch_threads": _threads(), "runs": rows, "summary": summary,
        "peers": compare_peers(rows), "splits": {str(s): [asdict(f) for f in fs] for s, fs in ctx["folds"].items()},
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
        "load_average_after": _load_average(), "class_counts": ctx["class_counts"], "warnings": warnings,
    }  # fmt: skip


def _torchmil_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchmil")
    except PackageNotFoundError:
        return "unknown"


def _load_average() -> list[float]:
    import os

    try:
        return list(os.getloadavg())
    except OSError:
        return []


def _threads() -> int:
    import torch

    return torch.get_num_threads()
