"""Imbalance experiments: re-train an aggregator under controlled sex imbalance and with age bands left out.

After Sadafi et al. (2023, "A Study of Age and Sex Bias in Multiple Instance Learning based Classification
of AML Subtypes"): a fixed test set is held out once (stratified by class and sex); from the remaining
patients, training sets of one fixed size are drawn with female fractions 0 .. 1, and, separately, with
each age band excluded in turn (same size as the baseline that excludes nothing), several seeds each.
Every trained model is evaluated on the fixed female/male and per-age-band test sets. The effect of the
female fraction is tested with an OLS trend over all runs; the effect of excluding an age band with the
paired (same seed) difference against the baseline, with t-intervals.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import UserError
from feature_cache.progress import progress
from milcore.audit.config import AuditConfig, ExperimentSpec
from milcore.metrics import HEADLINE

log = logging.getLogger(__name__)

METRICS = HEADLINE  # what every run records, per test group


def _stratified_take(rng: np.random.Generator, idx: np.ndarray, strata: np.ndarray, share: float) -> np.ndarray:
    """About ``share`` of each stratum of ``idx`` (at least one where the stratum has two or more)."""
    out = []
    for s in np.unique(strata[idx]):
        members = idx[strata[idx] == s]
        k = round(share * len(members))
        k = max(k, 1) if len(members) >= 2 else k
        out.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def _draw(rng: np.random.Generator, idx: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``k`` of ``idx`` without replacement, spread over classes as evenly as their sizes allow."""
    if k >= len(idx):
        return np.sort(idx)
    order = rng.permutation(idx)
    # round-robin over classes keeps the class mix close to the pool's
    by_class = [list(order[labels[order] == c]) for c in np.unique(labels[idx])]
    share = np.asarray([len(b) for b in by_class], dtype=float) / len(idx)
    quota = np.floor(share * k).astype(int)
    for j in np.argsort(-(share * k - quota))[: k - quota.sum()]:
        quota[j] += 1
    return np.sort(np.concatenate([np.asarray(b[:q], dtype=np.int64) for b, q in zip(by_class, quota, strict=True)]))


class ImbalanceCohort:
    """What every training of one imbalance experiment shares: the labelled bags (features in memory), each
    patient's sex and age band, the fixed test set and its groups, and the pool training sets are drawn from."""

    def __init__(self, spec: ExperimentSpec, config: AuditConfig) -> None:
        from feature_cache.bank import open_reader
        from milcore.audit.groups import _age_values, _sex_values
        from milcore.data.cohort import join_bank, read_cohort
        from milcore.data.store import FeatureStore

        self.spec, self.config = spec, config
        bank = open_reader(spec.bank)
        cohort, _ = join_bank(read_cohort(spec.cohort, spec.task), bank.bag_ids(), sizes=bank.bag_sizes())
        self.notes: list[str] = []
        self.classes = list(cohort.classes)
        self.ids = [str(b) for b in cohort.bag_ids]
        self.labels = np.asarray(cohort.labels, dtype=np.int64)
        if "sex" not in cohort.columns:
            raise UserError(f"{spec.cohort}: no 'sex' column; the imbalance experiment needs one")
        self.sex = _sex_values(cohort.columns["sex"], self.notes)
        if spec.age and "age" not in cohort.columns:
            self.notes.append("age: no 'age' column; the age-band experiment is skipped")
        self.age = (_age_values(cohort.columns["age"], config.age_bands, self.notes) if "age" in cohort.columns
                    else np.full(len(self.ids), "", dtype=object))  # fmt: skip
        from milcore.models import aggregator_needs

        self.store = FeatureStore(bank, self.ids, 1 << 62, aggregator_needs(spec.train.model).coords,
                                  labels=self.labels, classes=self.classes, cohort=cohort)  # fmt: skip
        rng = np.random.default_rng([config.seed, 7001])
        known = np.flatnonzero(self.sex != "")
        strata = np.asarray([f"{y}|{s}" for y, s in zip(self.labels, self.sex, strict=True)], dtype=object)
        self.test = _stratified_take(rng, known, strata, spec.test_fraction)
        pool = np.setdiff1d(np.arange(len(self.ids)), self.test)
        self.pool = pool
        if len(self.test) == 0 or len(pool) < 4:
            raise UserError(f"{spec.cohort}: too few patients with a known sex ({len(known)}) for an experiment")
        self.test_groups = {"all": self.test, "sex=F": self.test[self.sex[self.test] == "F"],
                            "sex=M": self.test[self.sex[self.test] == "M"]}  # fmt: skip
        for lo, hi in config.age_bands:
            band = f"{lo}-{hi}"
            self.test_groups[f"age={band}"] = self.test[self.age[self.test] == band]

    def train_eval(self, train_idx: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
        """Train on ``train_idx`` (a validation share split off) with :func:`~milcore.training.fold.fit_fold`,
        evaluate on every fixed test group."""
        from milcore.data.splits import Fold
        from milcore.metrics import scalar_metrics
        from milcore.training.fold import fit_fold

        spec = self.spec
        rng = np.random.default_rng([self.config.seed, seed, 7002])
        val = _stratified_take(rng, train_idx, self.labels.astype(str), spec.val_fraction)
        train = np.setdiff1d(train_idx, val)
        config = spec.train.replace(seed=seed, min_epochs=min(spec.train.min_epochs, spec.train.epochs))
        ids = self.ids
        fold = Fold(seed, tuple(ids[i] for i in train), tuple(ids[i] for i in val), tuple(ids[i] for i in self.test))
        proba = fit_fold(config, self.store, fold, desc=f"seed {seed}", attention=False).proba
        pos = {int(i): j for j, i in enumerate(self.test)}
        out: dict[str, dict[str, float]] = {}
        for name, members in self.test_groups.items():
            if len(members) == 0:
                continue
            rows = np.asarray([pos[int(i)] for i in members])
            m = scalar_metrics(self.labels[members], proba[rows], self.config.n_bins)
            out[name] = {k: float(m[k]) for k in METRICS} | {"n": len(members)}
        return out


def _sex_runs(lab: ImbalanceCohort, bar) -> tuple[list[dict[str, Any]], int]:
    spec = lab.spec
    pool_f = lab.pool[lab.sex[lab.pool] == "F"]
    pool_m = lab.pool[lab.sex[lab.pool] == "M"]
    size = spec.train_size or min(len(pool_f), len(pool_m))
    if size > min(len(pool_f), len(pool_m)):
        raise UserError(f"--train-size {size}: only {len(pool_f)} female and {len(pool_m)} male training patients "
                        f"are available; fractions 0 and 1 need {size} of each")  # fmt: skip
    if size < 4:
        raise UserError(f"{spec.cohort}: too few training patients per sex ({size}) for the sex experiment")
    runs = []
    for f in spec.fractions:
        n_f = round(f * size)
        for s in range(spec.seeds):
            rng = np.random.default_rng([lab.config.seed, s, 7003, round(f * 1000)])
            idx = np.concatenate([_draw(rng, pool_f, lab.labels, n_f), _draw(rng, pool_m, lab.labels, size - n_f)])
            runs.append({"experiment": "sex", "condition": f"female={f:g}", "female_fraction": f, "seed": s,
                         "n_train": len(idx), "n_female": n_f, "test": lab.train_eval(idx, s)})  # fmt: skip
            bar.update(1)
    return runs, size


def _age_runs(lab: ImbalanceCohort, bar) -> tuple[list[dict[str, Any]], int, list[str]]:
    spec, config = lab.spec, lab.config
    bands = [f"{lo}-{hi}" for lo, hi in config.age_bands]
    present = [b for b in bands if (lab.age[lab.pool] == b).any() and (lab.age[lab.test] == b).any()]
    known = lab.pool[lab.age[lab.pool] != ""]
    size = spec.train_size or (len(known) - max((int((lab.age[known] == b).sum()) for b in present), default=0))
    if size < 4:
        return [], size, present
    runs = []
    for condition in ["none", *present]:
        allowed = known if condition == "none" else known[lab.age[known] != condition]
        if len(allowed) < size:
            continue
        for s in range(spec.seeds):
            rng = np.random.default_rng(
                [config.seed, s, 7004, bands.index(condition) + 1 if condition != "none" else 0]
            )
            idx = _draw(rng, allowed, lab.labels, size)
            runs.append({"experiment": "age", "condition": f"exclude={condition}", "excluded": condition, "seed": s,
                         "n_train": len(idx), "test": lab.train_eval(idx, s)})  # fmt: skip
            bar.update(1)
    return runs, size, present


def analyse(runs: list[dict[str, Any]], fractions: tuple[float, ...], bands: list[str], alpha: float,
            min_group: int = 10) -> dict[str, Any]:  # fmt: skip
    """Per-condition means with CIs, the female-fraction trends and the paired age-exclusion effects.

    Effects measured on a test group smaller than ``min_group`` carry ``status: insufficient``.
    """
    from milcore.audit.statistics import linear_trend, paired_effect
    from milcore.metrics import mean_ci

    out: dict[str, Any] = {"sex": {}, "age": {}}
    sex_runs = [r for r in runs if r["experiment"] == "sex"]
    if sex_runs:
        curves: dict[str, Any] = {}
        trends: dict[str, Any] = {}
        for group in ("sex=F", "sex=M", "all"):
            for m in METRICS:
                ys = [r["test"].get(group, {}).get(m, math.nan) for r in sex_runs]
                xs = [r["female_fraction"] for r in sex_runs]
                curves[f"{group}:{m}"] = [{"female_fraction": f, **mean_ci([y for x, y in zip(xs, ys, strict=True)
                                           if x == f], alpha)} for f in fractions]  # fmt: skip
                trends[f"{group}:{m}"] = linear_trend(xs, ys, alpha)
        gaps = [r["test"].get("sex=F", {}).get("balanced_accuracy", math.nan)
                - r["test"].get("sex=M", {}).get("balanced_accuracy", math.nan) for r in sex_runs]  # fmt: skip
        trends["gap_F_minus_M:balanced_accuracy"] = linear_trend([r["female_fraction"] for r in sex_runs], gaps, alpha)
        out["sex"] = {"curves": curves, "trends": trends}
    age_runs = [r for r in runs if r["experiment"] == "age"]
    if age_runs:
        base = {r["seed"]: r for r in age_runs if r["excluded"] == "none"}
        effects = []
        for band in bands:
            for target in (f"age={band}", "all"):
                for m in METRICS:
                    diffs = [r["test"].get(target, {}).get(m, math.nan) - base[r["seed"]]["test"].get(target, {}).get(
                        m, math.nan) for r in age_runs if r["excluded"] == band and r["seed"] in base]  # fmt: skip
                    if not diffs:
                        continue
                    n_test = next((r["test"][target]["n"] for r in age_runs if target in r["test"]), 0)
                    status = "ok" if n_test >= min_group else "insufficient"
                    effects.append({"excluded": band, "test_group": target, "metric": m, "n_test": n_test,
                                    "status": status, **paired_effect(diffs, alpha)})  # fmt: skip
        out["age"] = {"effects": effects}
    return out


def run_imbalance_experiment(spec: ExperimentSpec, config: AuditConfig, out: str | Path, *,
                             overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run the sex-fraction and age-exclusion experiments; write ``audit.json``/``audit.md``/``audit.html``.

    Returns:
        The content of ``audit.json``.
    """
    from milcore.audit.report_imbalance import experiment_warnings, write_experiment_report
    from milcore.audit.run import prepare_out
    from milcore.models import get_aggregator_entry
    from milcore.report.files import write_json_atomic

    get_aggregator_entry(spec.train.model)
    t0 = time.perf_counter()
    out = Path(out)
    prepare_out(out, overwrite, create=False)
    lab = ImbalanceCohort(spec, config)  # validates the bank and cohort first: bad input leaves no folder behind
    out.mkdir(parents=True, exist_ok=True)
    small = [k for k, v in lab.test_groups.items() if 0 < len(v) < config.min_group_size]
    if small:
        lab.notes.append(f"test groups below {config.min_group_size} patients (treat their numbers as anecdotal): "
                         + ", ".join(f"{k} ({len(lab.test_groups[k])})" for k in small))  # fmt: skip
    for note in lab.notes:
        log.info("audit experiment: %s", note)
    n_age = (1 + len({b for b in lab.age[lab.pool] if b})) * spec.seeds if spec.age else 0
    bar = progress(total=len(spec.fractions) * spec.seeds + n_age, desc="audit experiment", unit="run")
    runs, sex_size = _sex_runs(lab, bar)
    age_size, present = 0, []
    if spec.age:
        age_runs, age_size, present = _age_runs(lab, bar)
        runs += age_runs
        if not age_runs:
            lab.notes.append(f"age: too few patients with a known age for the exclusion experiment ({age_size})")
    bar.close()
    result: dict[str, Any] = {
        "format": "milcore-audit-experiment", "format_version": 1, "spec": asdict(spec), "config": config.to_dict(),
        "classes": lab.classes, "notes": lab.notes,
        "design": {"patients": len(lab.ids), "test": {k: len(v) for k, v in lab.test_groups.items()},
                   "pool": len(lab.pool), "sex_train_size": sex_size, "age_train_size": age_size,
                   "age_bands_excluded": present},
        "runs": runs,
        "analysis": analyse(runs, spec.fractions, present, config.alpha, config.min_group_size),
    }  # fmt: skip
    result["seconds"] = time.perf_counter() - t0
    result["warnings"] = experiment_warnings(result)  # a chance-level model (milcore.audit.report_imbalance)
    write_json_atomic(out / "audit.json", result)
    write_experiment_report(out, result)
    return result
