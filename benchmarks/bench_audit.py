"""Power and false-alarm rate of ``milcore audit`` on planted biases, old vs new tests, and the experiment's wall time.

Tests compared (issue 19), on the same predictions (:data:`VARIANTS`): ``old`` is the audit before issue 19
(balanced accuracy, group membership permuted over all patients, two-sided, Holm); the others are one-sided
class-stratified tests corrected by Westfall-Young step-down min-P on joint permutations with alpha shared by
attribute, with the class-balanced Brier score (round 2's default), the true-class log-odds alone, balanced accuracy
alone, and both of the last two per group in one family (round 3's default). ``ceiling`` prints the most any test
can flag where a bias shows only in which answers are right (the ``flip`` planting model).

Power / false alarms. Rendering and encoding a fresh 400-patient cohort per seed costs minutes on CPU, so
the cohorts are re-drawn at the feature level from one extracted synthetic bank (``morphology`` encoder):
its cells are pooled by kind (each class's diagnostic cells, using ``cells.csv``; all non-diagnostic cells)
and every seed draws new patients exactly as ``milcore synth`` does (balanced classes, random sex, age
N(58, 16), log-normal bag sizes and diagnostic-cell rates; ``--bias sex=F:FACTOR`` scales the female
diseased patients' diagnostic-cell rate), writes a bank and a cohort table, cross-validates ABMIL with
``train_run`` and audits the out-of-fold predictions. A seed "flags" when the primary family (the
test's primary metric on the single-attribute groups of the primary attributes, Holm) flags ``sex=F``;
any other primary or secondary flag is counted as well. ``stats`` does the same on simulated labelled
predictions (the statistics level: no training), which is what the issue-19 grid in benchmarks/README.md
is.

    python benchmarks/bench_audit.py power --out runs/bench_audit            # train (resumable), audit old and new
    python benchmarks/bench_audit.py stats --out runs/bench_audit_stats      # the statistics alone, by cohort size
                                                                             # (--primary-attributes sex: sex primary)
    python benchmarks/bench_audit.py families --out runs/bench_audit_families  # choosing the primary statistics
    python benchmarks/bench_audit.py ceiling --out runs/bench_audit_ceiling  # the flip model's power ceiling
    python benchmarks/bench_audit.py experiment --out runs/bench_audit_exp   # time 'milcore audit experiment'
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("milcore.bench")


def base_bank(root: Path, patients: int, seed: int) -> tuple[Path, Path]:
    """Synthesize and extract (morphology) the source cohort once; reused when present."""
    from milcore.cli import main

    cohort, bank = root / "base_cohort", root / "base.h5"
    if not (cohort / "cells.csv").exists():
        code = main(["-q", "synth", str(cohort), "--task", "aml", "--patients", str(patients), "--seed", str(seed),
                     "--bag-median", "150", "--overwrite"])  # fmt: skip
        assert code == 0, "synth failed"
    if not bank.exists():
        code = main(["-q", "extract", "--source", "synthetic", "--input", str(cohort), "--encoder", "morphology",
                     "--out", str(bank), "--device", "cpu", "--overwrite"])  # fmt: skip
        assert code == 0, "extract failed"
    return cohort, bank


class CellPools:
    """Features of the source bank pooled by cell kind."""

    def __init__(self, cohort: Path, bank_path: Path) -> None:
        from feature_cache.bank import open_reader
        from milcore.data.cohort import read_cohort
        from milcore.data.ground_truth import load_cell_truth

        bank = open_reader(bank_path)
        table = read_cohort(cohort / "cohort.csv", "aml")
        ids = [str(b) for b in table.bag_ids]
        truth = load_cell_truth(cohort / "cells.csv", bank, ids)
        x, ptr = bank.read_packed(ids)
        x = np.asarray(x, dtype=np.float32)
        flags = np.concatenate([truth[b] for b in ids])
        bag_label = np.repeat(table.labels, np.diff(np.asarray(ptr)))
        self.classes = list(table.classes)
        self.info = bank.info
        self.features = x  # (N, D)
        self.background = np.flatnonzero(~flags)
        self.diagnostic = {c: np.flatnonzero(flags & (bag_label == c)) for c in range(len(self.classes))}

    def draw_cohort(self, out: Path, patients: int, seed: int, female_factor: float) -> tuple[Path, Path]:
        """A new cohort drawn like ``milcore synth`` (bag median 100); returns (bank, cohort.csv)."""
        from feature_cache.bank import open_writer

        rng = np.random.default_rng([seed, 424242])
        C = len(self.classes)
        labels = np.array([i % C for i in range(patients)])
        rng.shuffle(labels)
        sexes = rng.choice(["F", "M"], size=patients)
        ages = np.clip(np.rint(rng.normal(58, 16, patients)), 18, 90).astype(int)
        sizes = np.clip(np.rint(100 * np.exp(rng.normal(0, 0.5, patients))), 20, 400).astype(int)
        rates = np.clip(0.06 * np.exp(rng.normal(0, 0.7, patients)), 0.01, 0.5)
        out.mkdir(parents=True, exist_ok=True)
        bank_path, cohort_path = out / "bank.h5", out / "cohort.csv"
        control = self.classes.index("control")
        with open_writer(bank_path, self.info, mode="w") as w, open(cohort_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["patient_id", "aml", "age", "sex", "site"])
            for i in range(patients):
                n, y = int(sizes[i]), int(labels[i])
                rate = rates[i] * (female_factor if sexes[i] == "F" else 1.0)
                n_diag = 0 if y == control else int(min(n, max(1, round(rate * n))))
                rows = np.concatenate([rng.choice(self.diagnostic[y], n_diag) if n_diag else np.zeros(0, np.int64),
                                       rng.choice(self.background, n - n_diag)])  # fmt: skip
                bag = f"p{i:04d}"
                w.append(bag, self.features[rng.permutation(rows)])
                writer.writerow([bag, self.classes[y], int(ages[i]), sexes[i], 0])
        return bank_path, cohort_path


#: The audit before issue 19: balanced accuracy, membership permuted over all patients, two-sided.
OLD_TEST = {"primary_metrics": ("balanced_accuracy",), "alternative": "two-sided", "permute_within_class": False,
            "test_metrics": ("balanced_accuracy", "macro_f1", "auroc", "ece"), "correction": "holm",
            "primary_weights": "tests"}  # fmt: skip


def one_seed(pools: CellPools, root: Path, patients: int, seed: int, factor: float, epochs: int) -> dict:
    """Draw and cross-validate one cohort; keeps its out-of-fold ``predictions.csv`` and ``cohort.csv``."""
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    t0 = time.perf_counter()
    folder = root / f"f{factor:g}_s{seed}"
    bank, cohort = pools.draw_cohort(folder, patients, seed, factor)
    spec = RunSpec(bank=str(bank), cohort=str(cohort), task="aml", folds=5, seed=seed, n_boot=100)
    config = TrainConfig(model="abmil", epochs=epochs, patience=6, device="cpu", seed=seed, num_workers=0)
    metrics = train_run(spec, config, folder / "run", overwrite=True).metrics
    row = {"factor": factor, "seed": seed, "patients": patients, "ba": metrics["balanced_accuracy"],
           "folder": folder.name, "seconds_train": time.perf_counter() - t0}  # fmt: skip
    log.info("factor %g seed %d: BA %.3f (%.0f s)", factor, seed, row["ba"], row["seconds_train"])
    for p in (folder / "run").rglob("*.h5"):  # keep the disk small: attention and banks are not needed later
        p.unlink()
    bank.unlink()
    return row


#: The audits compared on the same predictions (issue 19): the test before issue 19; round 2's default (one-sided
#: class-stratified Brier tests, Westfall-Young step-down min-P on joint permutations, alpha shared by attribute);
#: the same procedure with the true-class log-odds alone and balanced accuracy alone; and round 3's default, both
#: statistics per group in one Westfall-Young family.
VARIANTS = {"old": OLD_TEST,
            "brier": {"primary_metrics": ("balanced_brier",)},
            "log_odds": {"primary_metrics": ("balanced_log_odds",)},
            "accuracy": {"primary_metrics": ("balanced_accuracy",)},
            "pair": {"primary_metrics": ("balanced_log_odds", "balanced_accuracy")}}  # fmt: skip
#: What every variant but ``old`` shares (the audit's defaults, written out so a change of default shows here).
WESTFALL_YOUNG = {"correction": "westfall-young", "primary_weights": "attributes", "alternative": "worse",
                  "permute_within_class": True}  # fmt: skip


def audit_both(pred, classes: list[str], groups, seed: int, target: str = "sex=F", **overrides) -> dict:
    """Audit the same predictions with every test of :data:`VARIANTS`; the flags each would raise.

    ``female_flagged`` (the key of the stored results) says whether ``target`` (``sex=F`` unless another planted
    group is named) was flagged by any of its primary tests; ``mde`` and ``first_step_p`` give each primary
    metric's minimum detectable effect and the raw p-value its test must pass at the first step.
    """
    from milcore.audit.config import AuditConfig
    from milcore.audit.stratified import audit_predictions

    out: dict = {}
    for name, changes in VARIANTS.items():
        config = AuditConfig(**{**overrides, **(WESTFALL_YOUNG if name != "old" else {}), **changes, "seed": seed})
        t0 = time.perf_counter()
        audit = audit_predictions(pred, classes, groups, config) | {"config": config.to_dict()}
        seconds = time.perf_counter() - t0
        mine = [c for c in audit["comparisons"] if c["group"] == target and c["family"] == "primary"]
        first = audit["families"]["primary"]["first_step_p"]
        secondary = any(c["flagged"] for c in audit["comparisons"] + audit["parity"] if c["family"] == "secondary")
        out[name] = {"primary_metrics": list(config.primary_metrics), "female_flagged": any(c["flagged"] for c in mine),
                     "any_primary_flag": bool(audit["summary"]["primary_flagged"]),
                     "any_flag": bool(audit["summary"]["flagged_groups"]) or secondary,
                     "p_corrected": min(c["p_corrected"] for c in mine),
                     "mde": {c["metric"]: c.get("mde") for c in mine},
                     "first_step_p": {c["metric"]: first.get(c["test_key"]) for c in mine},
                     "seconds": seconds}  # fmt: skip
    return out


def audit_folder(root: Path, row: dict) -> dict:
    """Audit one trained seed's out-of-fold predictions with both tests."""
    from milcore.audit.config import AuditConfig
    from milcore.audit.groups import build_groups, read_metadata
    from milcore.data.predictions import read_predictions
    from milcore.metrics.weighted import LabelledPredictions

    folder = root / row["folder"]
    table = read_predictions(folder / "run")
    columns, matched, _ = read_metadata(folder / "cohort.csv", list(table.bag_ids))
    pos = {b: i for i, b in enumerate(table.bag_ids)}
    idx = np.asarray([pos[b] for b in matched])
    pred = LabelledPredictions(table.labels[idx], table.proba[idx])
    groups = build_groups(columns, len(matched), AuditConfig(attributes=("sex", "age")))
    both = audit_both(pred, list(table.classes), groups, row["seed"], attributes=("sex", "age"))
    female = groups.values["sex"] == "F"
    ba = weighted_ba(pred, female)
    return row | both | {"gap_F_minus_M": ba}


def _members(cols: dict, target: str) -> np.ndarray:
    """(n,) bool: the patients of ``target`` (``sex=F``, ``age=72-86``) in simulated cohort columns."""
    column, _, level = target.partition("=")
    if column == "sex":
        return cols["sex"] == level
    lo, hi = (int(v) for v in level.split("-"))
    age = cols["age"].astype(int)
    return (age >= lo) & (age <= hi)


def weighted_ba(pred, female: np.ndarray) -> float:
    """Balanced accuracy of women minus men."""
    from milcore.metrics.weighted import weighted_metrics

    m = weighted_metrics(pred, np.stack([female, ~female]).astype(float), with_auroc=False)["balanced_accuracy"]
    return float(m[0] - m[1])


def power(args: argparse.Namespace) -> int:
    """Train the seeds not trained yet (resumable), then audit every seed's predictions with the old and new tests."""
    from milcore.report.bench_io import machine_info, save_bench

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    cohort, bank = base_bank(root, args.base_patients, args.base_seed)
    results_path = root / "rows.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["factor"], r["seed"])] = r
    plan = [(f, s) for s in range(args.seeds) for f in args.factors]  # seed-major: every factor advances together
    pools = None
    for factor, seed in plan:
        if (factor, seed) not in done and not args.audit_only:
            pools = pools or CellPools(cohort, bank)
            r = one_seed(pools, root, args.patients, seed, factor, args.epochs)
            with open(results_path, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            done[(factor, seed)] = r
    rows = [audit_folder(root, done[k]) for k in plan if k in done]
    summary = []
    for factor in args.factors:
        rs = [r for r in rows if r["factor"] == factor]
        if not rs:
            continue
        gaps = np.asarray([r["gap_F_minus_M"] for r in rs], dtype=float)
        entry = {"factor": factor, "seeds": len(rs), "mean_ba": float(np.mean([r["ba"] for r in rs])),
                 "mean_gap_F": float(np.mean(gaps)), "sd_gap_F": float(np.std(gaps, ddof=1)) if len(rs) > 1 else 0.0,
                 "seeds_gap_10": int(np.sum(gaps <= -0.10)),
                 "seconds_train": float(np.mean([r["seconds_train"] for r in rs]))}  # fmt: skip
        entry.update(_rates(rs))
        summary.append(entry)
    lines = [f"audit power / false alarms, end to end: {args.patients} patients, ABMIL 5-fold CV, morphology features, "
             "audited by sex and age (primary family: sex=F, sex=M and the age bands)", "",
             "| female rate factor | seeds | mean BA | F-M BA gap (mean ± sd) | " + " | ".join(_COLUMNS) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(_COLUMNS)]  # fmt: skip
    for e in summary:
        lines.append(f"| {e['factor']:g} | {e['seeds']} | {e['mean_ba']:.3f} | {e['mean_gap_F']:+.3f} ± "
                     f"{e['sd_gap_F']:.3f} | " + " | ".join(_cell(e, k) for k in _COLUMNS) + " |")  # fmt: skip
    result = {"benchmark": "audit_power", "machine": machine_info(), "args": vars(args) | {"func": None},
              "old_test": OLD_TEST, "variants": VARIANTS, "summary": summary, "rows": rows}  # fmt: skip
    save_bench(root, result, "\n".join(lines))
    return 0


#: Columns of the power tables: name -> (variant, key): ``target`` flagged by each audit, and any flag of either
#: family (on unbiased cohorts: the false-alarm rate).
_COLUMNS = {"old: F flagged": ("old", "female_flagged"),
            "WY Brier (round 2): F flagged": ("brier", "female_flagged"),
            "WY log-odds: F flagged": ("log_odds", "female_flagged"),
            "WY bal. acc.: F flagged": ("accuracy", "female_flagged"),
            "WY log-odds + bal. acc. (new): F flagged": ("pair", "female_flagged"),
            "old: any flag": ("old", "any_flag"), "round 2: any flag": ("brier", "any_flag"),
            "new: any flag": ("pair", "any_flag")}  # fmt: skip
#: MDE columns (target group, 80% power): name -> (variant, metric).
_MDES = {"MDE Brier (round 2)": ("brier", "balanced_brier"), "MDE log-odds (new)": ("pair", "balanced_log_odds"),
         "MDE bal. acc. (new)": ("pair", "balanced_accuracy")}  # fmt: skip


def _rates(rs: list[dict]) -> dict:
    out = {name: float(np.mean([r[side][key] for r in rs])) for name, (side, key) in _COLUMNS.items()}
    for name, (side, metric) in _MDES.items():
        mdes = np.asarray([np.nan if (v := r[side]["mde"].get(metric)) is None else v for r in rs])
        out[name] = float(np.nanmean(mdes)) if np.isfinite(mdes).any() else None
    thresholds = [r["pair"]["first_step_p"].get("balanced_accuracy") for r in rs]
    out["pair_first_step_p_accuracy"] = float(np.mean([t for t in thresholds if t is not None] or [np.nan]))
    for side in VARIANTS:
        out[f"seconds_audit_{side}"] = float(np.mean([r[side]["seconds"] for r in rs]))
    return out


def _cell(entry: dict, key: str) -> str:
    return "–" if entry.get(key) is None or not np.isfinite(entry[key]) else f"{entry[key]:.0%}"


def error_rate_ceiling(n_group: float, n_rest: float, correct_group: float, correct_rest: float,
                       alpha: float) -> float:  # fmt: skip
    """Power of the one-sided two-sample test of proportions (pooled variance under the null, normal approximation)
    that the group's share of correct answers is below the rest's, at level ``alpha``.

    Where a bias shows only in which answers are right (``flip``: the probabilities say nothing else about the
    group), this is the most a test can do (the large-sample form of the uniformly most powerful unbiased test of
    two binomials, Fisher-Tocher's), so no per-patient score or family can flag the gap more often at that level.
    """
    from scipy.stats import norm

    if not np.isfinite(alpha) or alpha <= 0:
        return float("nan")
    pooled = (n_group * correct_group + n_rest * correct_rest) / (n_group + n_rest)
    sd0 = np.sqrt(pooled * (1 - pooled) * (1 / n_group + 1 / n_rest))
    sd1 = np.sqrt(correct_group * (1 - correct_group) / n_group + correct_rest * (1 - correct_rest) / n_rest)
    return float(norm.cdf((correct_rest - correct_group - norm.ppf(1 - alpha) * sd0) / sd1))


def simulated_ceiling(n: int, correct_group: float, correct_rest: float, alpha: float, reps: int,
                      rng: np.random.Generator) -> float:  # fmt: skip
    """:func:`error_rate_ceiling` by simulation: cohorts of ``n`` with the group drawn at random (half), the same
    one-sided pooled z-test; the share of cohorts where it rejects at ``alpha``."""
    from scipy.stats import norm

    n_group = rng.binomial(n, 0.5, reps)
    n_rest = n - n_group
    right_group, right_rest = rng.binomial(n_group, correct_group), rng.binomial(n_rest, correct_rest)
    pooled = (right_group + right_rest) / n
    sd0 = np.sqrt(pooled * (1 - pooled) * (1 / n_group + 1 / n_rest))
    z = (right_rest / n_rest - right_group / n_group) / np.where(sd0 > 0, sd0, np.inf)
    return float(np.mean(z > norm.ppf(1 - alpha)))


def ceiling(args: argparse.Namespace) -> int:
    """The power ceiling under ``flip``: the best test of an error-rate gap between two halves of a cohort, at the
    p-values each family asks of the sex=F test, analytic and by simulation."""
    from milcore.report.bench_io import machine_info, save_bench

    rng = np.random.default_rng(0)
    levels = {"pair, all attributes (measured)": args.pair_alpha, "one statistic, all attributes": 0.05 / 4,
              "one statistic, sex only": 0.05 / 2, "one pre-specified test": 0.05}  # fmt: skip
    rows = []
    for n in args.patients:
        for gap in args.gaps:
            for name, alpha in levels.items():
                rows.append({"patients": n, "gap": gap, "level": name, "alpha": alpha,
                             "analytic": error_rate_ceiling(n / 2, n / 2, BASE_ACCURACY - gap, BASE_ACCURACY, alpha),
                             "simulated": simulated_ceiling(n, BASE_ACCURACY - gap, BASE_ACCURACY, alpha, args.reps,
                                                            rng)})  # fmt: skip
    lines = [f"flip ceiling: one-sided pooled z-test of the error-rate gap, {BASE_ACCURACY:.0%} correct outside the "
             f"group, half the cohort in it ({args.reps} simulated cohorts per cell)", "",
             "| patients | planted gap | family | p-value asked of sex=F | power (analytic) | power (simulated) |",
             "|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['patients']} | {r['gap']:.2f} | {r['level']} | {r['alpha']:.4f} | {r['analytic']:.0%} | "
                     f"{r['simulated']:.0%} |")  # fmt: skip
    save_bench(args.out, {"benchmark": "audit_ceiling", "machine": machine_info(), "args": vars(args) | {"func": None},
                          "rows": rows}, "\n".join(lines))  # fmt: skip
    return 0


#: Men's share of correct predictions in the simulations; women get this minus the planted gap.
BASE_ACCURACY = 0.85


def simulated_predictions(n: int, seed: int, gap: float, model: str = "flip", base: float = BASE_ACCURACY,
                          classes: int = 5, target: str = "sex=F"):  # fmt: skip
    """Labels, probabilities and cohort columns where women's balanced accuracy is ``gap`` below men's (or, with
    ``target="age=LO-HI"``, that age band's below the other patients').

    ``flip``: each patient is right with probability ``base`` (men) or ``base - gap`` (women), and the
    probabilities carry nothing else about sex (how confident the model is does not depend on it).
    ``margin``: every class gets a standard normal logit and the true class a margin on top, chosen per sex
    so that it wins ``base`` and ``base - gap`` of the time (the model is less sure about women's true
    class, of which losing some of the argmax is one consequence); logits temperature-scaled on the cohort.
    """
    from milcore.metrics.calibration import fit_temperature, softmax

    rng = np.random.default_rng([seed, 515])
    y = rng.integers(0, classes, n)
    sex = rng.choice(["F", "M"], n)
    age = np.clip(np.rint(rng.normal(58, 16, n)), 18, 90).astype(int)
    column, _, level = target.partition("=")
    if column == "sex":
        hit = sex == level
    else:
        lo, hi = (int(v) for v in level.split("-"))
        hit = (age >= lo) & (age <= hi)
    if model == "flip":
        correct = rng.random(n) < np.where(hit, base - gap, base)
        pred = np.where(correct, y, (y + rng.integers(1, classes, n)) % classes)
        logits = rng.normal(0, 0.6, (n, classes))
        logits[np.arange(n), pred] += 2.0
        proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    elif model == "margin":
        logits = rng.normal(0, 1, (n, classes))
        logits[np.arange(n), y] += np.where(hit, _margin(base - gap, classes), _margin(base, classes))
        proba = softmax(logits, fit_temperature(logits, y))
    else:
        raise ValueError(f"unknown model {model!r}")
    return y, proba, {"sex": sex.astype(object), "age": age.astype(str).astype(object)}


def _margin(accuracy: float, classes: int) -> float:
    """The true-class margin m with P(N(m, 1) > max of classes - 1 standard normals) = ``accuracy``."""
    from scipy import integrate, optimize, stats

    def acc(m: float) -> float:
        return integrate.quad(lambda x: stats.norm.pdf(x) * stats.norm.cdf(x + m) ** (classes - 1), -12, 12)[0]

    return float(optimize.brentq(lambda m: acc(m) - accuracy, -3.0, 8.0, xtol=1e-6))


def stats(args: argparse.Namespace) -> int:
    """Power of the audit's statistics alone: simulated predictions with a known female accuracy gap."""
    from milcore.audit.config import AuditConfig
    from milcore.audit.groups import build_groups
    from milcore.metrics.weighted import LabelledPredictions
    from milcore.report.bench_io import machine_info, save_bench

    rows = []
    classes = [f"c{i}" for i in range(5)]
    attributes = tuple(args.attributes.split(","))
    primary = tuple(args.primary_attributes.split(",")) if args.primary_attributes else ()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds_path = out / "seeds.jsonl"  # one line per audited seed: an interrupted grid resumes where it stopped
    done = {}
    if seeds_path.exists():
        for line in seeds_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["patients"], r["planted_gap"], r["seed"], r["attributes"], r["primary"])
                 + ((r["target"],) if "target" in r else ())] = r
    for model in args.models:
        for n in args.patients:
            for gap in args.gaps:
                per_seed = []
                t0 = time.perf_counter()
                for seed in range(args.seeds):
                    key = (model, n, gap, seed, args.attributes, args.primary_attributes) + (
                        (args.target,) if args.target != "sex=F" else ())  # fmt: skip
                    if key in done:
                        per_seed.append(done[key])
                        continue
                    y, proba, cols = simulated_predictions(n, seed, gap, model, target=args.target)
                    pred = LabelledPredictions(y, proba)
                    groups = build_groups(cols, n, AuditConfig(attributes=attributes, intersections=False))
                    r = audit_both(pred, classes, groups, seed, attributes=attributes, intersections=False,
                                   per_class=False, n_boot=args.boot, n_perm=args.permutations,
                                   primary_attributes=primary, target=args.target)  # fmt: skip
                    r["gap_F_minus_M"] = weighted_ba(pred, _members(cols, args.target))
                    r |= dict(zip(("model", "patients", "planted_gap", "seed", "attributes", "primary", "target"),
                                  key, strict=False))
                    with open(seeds_path, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
                    per_seed.append(r)
                row = {"level": "statistics (simulated predictions)", "model": model, "patients": n,
                       "target": args.target, "planted_gap": gap, "seeds": args.seeds,
                       "attributes": args.attributes,
                       "mean_observed_ba_gap": float(np.mean([r["gap_F_minus_M"] for r in per_seed])),
                       "seconds": time.perf_counter() - t0} | _rates(per_seed)  # fmt: skip
                # flip: correctness is all the data say, so no test beats the best test of an error-rate gap at the
                # p-value the family asks of the balanced-accuracy test (the target's share: half the patients)
                row["ceiling"] = (error_rate_ceiling(n / 2, n / 2, BASE_ACCURACY - gap, BASE_ACCURACY,
                                                     row["pair_first_step_p_accuracy"])
                                  if model == "flip" and args.target.startswith("sex=") else None)  # fmt: skip
                rows.append(row)
                log.info("%s", row)
    lines = [f"audit statistics alone (simulated predictions, 5 classes, {BASE_ACCURACY:.0%} correct outside the "
             f"planted group {args.target} ('F' in the columns); audited by {args.attributes}, primary "
             f"{args.primary_attributes or 'all'}; {args.seeds} seeds per row)", "",
             "| model | patients | planted gap | observed BA gap | " + " | ".join(_COLUMNS) + " | ceiling (flip) | "
             + " | ".join(_MDES) + " |",
             "|---|---:|---:|---:|" + "---:|" * (len(_COLUMNS) + 1 + len(_MDES))]  # fmt: skip
    for r in rows:
        mdes = " | ".join("–" if r[k] is None else f"{r[k]:.3f}" for k in _MDES)
        lines.append(f"| {r['model']} | {r['patients']} | {r['planted_gap']:.2f} | {r['mean_observed_ba_gap']:+.3f} | "
                     + " | ".join(_cell(r, k) for k in _COLUMNS) + f" | {_cell(r, 'ceiling')} | {mdes} |")  # fmt: skip
    save_bench(args.out, {"benchmark": "audit_stats", "machine": machine_info(), "args": vars(args) | {"func": None},
                          "variants": VARIANTS, "rows": rows}, "\n".join(lines))  # fmt: skip
    return 0


def patient_scores(y: np.ndarray, proba: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate per-patient scores (larger = worse) for the primary test: (n,) each."""
    from scipy.stats import rankdata

    n, C = proba.shape
    true = proba[np.arange(n), y]
    rank = np.zeros(n)
    for c in range(C):  # within-class rank of the true-class probability (a stratified Wilcoxon statistic)
        i = y == c
        if i.any():
            rank[i] = (rankdata(-true[i]) - 0.5) / i.sum()
    odds = np.clip(np.log(np.clip(true, 1e-9, 1)) - np.log(np.clip(1 - true, 1e-9, 1)), -8, 8)
    return {"Brier score": ((proba - np.eye(C)[y]) ** 2).sum(1) / 2, "log-loss": -np.log(np.clip(true, 1e-12, 1)),
            "1 - true-class probability": 1 - true, "within-class rank": rank, "minus true-class log-odds": -odds,
            "error (accuracy)": (proba.argmax(1) != y).astype(float)}  # fmt: skip


def _balanced_gaps(score: np.ndarray, y: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(B,) class-balanced mean score of each row's group minus that of the other patients."""
    gaps = []
    for c in np.unique(y):
        i = y == c
        g, sc = masks[:, i].astype(float), score[i]
        gaps.append(g @ sc / np.maximum(g.sum(1), 1) - (1 - g) @ sc / np.maximum((1 - g).sum(1), 1))
    return np.mean(gaps, axis=0)


def scores(args: argparse.Namespace) -> int:
    """Which per-patient score separates a planted gap best: the standardized gap z of each candidate (within-class
    permutations) and the share of seeds past the one-sided first-step thresholds of the primary family."""
    from scipy.stats import norm

    from milcore.audit.statistics import stratified_permutation_masks
    from milcore.report.bench_io import machine_info, save_bench

    rng = np.random.default_rng(0)
    thresholds = {"z > z(0.05/7)": float(norm.ppf(1 - 0.05 / 7)), "z > z(0.05/4)": float(norm.ppf(1 - 0.05 / 4))}
    rows = []
    for model in args.models:
        for n in args.patients:
            z: dict[str, list[float]] = {}
            for seed in range(args.seeds):
                y, proba, cols = simulated_predictions(n, seed, args.gap, model)
                female = cols["sex"] == "F"
                masks = np.concatenate([female[None], stratified_permutation_masks(
                    rng, female, np.ones(n, bool), y, args.permutations)])  # fmt: skip
                for name, score in patient_scores(y, proba).items():
                    g = _balanced_gaps(score, y, masks)
                    z.setdefault(name, []).append(float((g[0] - g[1:].mean()) / g[1:].std(ddof=1)))
            for name, values in z.items():
                v = np.asarray(values)
                rows.append({"model": model, "patients": n, "gap": args.gap, "seeds": args.seeds, "score": name,
                             "mean_z": float(v.mean())} | {k: float(np.mean(v > t)) for k, t in thresholds.items()})
    lines = [f"per-patient scores: standardized gap z of sex=F (planted gap {args.gap}, {args.seeds} seeds, "
             f"{args.permutations} within-class permutations)", "",
             "| model | patients | score | mean z | " + " | ".join(thresholds) + " |",
             "|---|---:|---|---:|" + "---:|" * len(thresholds)]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['patients']} | {r['score']} | {r['mean_z']:.2f} | "
                     + " | ".join(f"{r[k]:.0%}" for k in thresholds) + " |")  # fmt: skip
    save_bench(args.out, {"benchmark": "audit_scores", "machine": machine_info(), "args": vars(args) | {"func": None},
                          "thresholds": thresholds, "rows": rows}, "\n".join(lines))  # fmt: skip
    return 0


#: Candidate primary families (issue 19, round 3): per-patient statistics tested per group, alone or in pairs.
FAMILIES = (("Brier score",), ("error (accuracy)",), ("log-loss",), ("minus true-class log-odds",),
            ("within-class rank",), ("1 - true-class probability",),
            ("minus true-class log-odds", "error (accuracy)"), ("minus true-class log-odds", "Brier score"),
            ("log-loss", "error (accuracy)"), ("Brier score", "error (accuracy)"),
            ("within-class rank", "error (accuracy)"), ("within-class rank", "Brier score"))  # fmt: skip


def families(args: argparse.Namespace) -> int:
    """Choosing the primary family: power of Westfall-Young (alpha by attribute) over sex and the age bands with each
    candidate set of per-patient statistics per group, on seeds the reported tables do not use (from 1000)."""
    from milcore.audit.config import DEFAULT_AGE_BANDS
    from milcore.audit.statistics import class_permutations, westfall_young
    from milcore.report.bench_io import machine_info, save_bench

    rng = np.random.default_rng(12345)
    rows = []
    for model in args.models:
        for gap in args.gaps:
            hits = dict.fromkeys(FAMILIES, 0)
            anyf = dict.fromkeys(FAMILIES, 0)
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            for seed in seeds:
                y, proba, cols = simulated_predictions(args.patients, seed, gap, model)
                age = cols["age"].astype(int)
                groups = [("sex", cols["sex"] == "F"), ("sex", cols["sex"] == "M")]
                for lo, hi in DEFAULT_AGE_BANDS:
                    m = (age >= lo) & (age <= hi)
                    if m.sum() >= 10 and (~m).sum() >= 10:
                        groups.append(("age", m))
                masks = np.stack([g[1] for g in groups]).astype(float)  # (G, n)
                perms = class_permutations(rng, y, args.permutations)  # (B, n)
                obs, null = {}, {}
                for name, score in patient_scores(y, proba).items():
                    obs[name] = _balanced_gaps(score, y, masks)  # (G,) larger = worse
                    null[name] = np.stack([_balanced_gaps(score, y, masks[j][perms]) for j in range(len(groups))], 1)
                for fam in FAMILIES:
                    attrs = [g[0] for g in groups] * len(fam)
                    per = {a: attrs.count(a) for a in set(attrs)}
                    weights = np.asarray([1.0 / (len(per) * per[a]) for a in attrs])
                    adj = westfall_young(np.concatenate([obs[m] for m in fam]),
                                         np.concatenate([null[m] for m in fam], axis=1), weights=weights)
                    flags = adj < 0.05
                    hits[fam] += bool(flags[:: len(groups)].any())  # column 0 of each statistic's block: sex=F
                    anyf[fam] += bool(flags.any())
            for fam in FAMILIES:
                rows.append({"model": model, "gap": gap, "patients": args.patients, "seeds": args.seeds,
                             "first_seed": args.first_seed, "family": " + ".join(fam),
                             "f_flagged": hits[fam] / args.seeds, "any_flag": anyf[fam] / args.seeds})  # fmt: skip
    lines = [f"candidate primary families: Westfall-Young by attribute over sex and the age bands, {args.patients} "
             f"patients, seeds {args.first_seed}-{args.first_seed + args.seeds - 1}, {args.permutations} joint "
             "within-class permutations", "", "| model | planted gap | statistics per group | F flagged | any flag |",
             "|---|---:|---|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['gap']:.2f} | {r['family']} | {r['f_flagged']:.0%} | {r['any_flag']:.0%} |")
    save_bench(args.out, {"benchmark": "audit_families", "machine": machine_info(), "args": vars(args) | {"func": None},
                          "rows": rows}, "\n".join(lines))  # fmt: skip
    return 0


def experiment(args: argparse.Namespace) -> int:
    """Wall time of 'milcore audit experiment' with its defaults on an existing bank and cohort."""
    from milcore.cli import main
    from milcore.report.bench_io import machine_info, save_bench

    t0 = time.perf_counter()
    code = main(["-q", "audit", "experiment", "--bank", args.bank, "--cohort", args.cohort, "--task", args.task,
                 "--out", str(Path(args.out) / "experiment"), "--device", "cpu", "--overwrite"])  # fmt: skip
    seconds = time.perf_counter() - t0
    exp = json.loads((Path(args.out) / "experiment" / "audit.json").read_text()) if code == 0 else {}
    table = (
        f"| command | trainings | wall s | target s |\n|---|---:|---:|---:|\n"
        f"| audit experiment ({args.bank}) | {len(exp.get('runs', []))} | {seconds:.0f} | 600 |"
    )
    save_bench(args.out, {"benchmark": "audit_experiment", "machine": machine_info(), "seconds": seconds,
                          "exit_code": code, "trainings": len(exp.get("runs", [])), "bank": args.bank,
                          "threads": args.threads}, table)  # fmt: skip
    return code


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark."""
    import torch

    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("power")
    p.add_argument("--out", default="runs/bench_audit")
    p.add_argument("--patients", type=int, default=400)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--factors", type=lambda t: [float(v) for v in t.split(",")], default=[0.3, 1.0])
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--base-patients", type=int, default=100)
    p.add_argument("--base-seed", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--audit-only", action="store_true", help="audit the seeds trained so far; train nothing")
    p.set_defaults(func=power)
    st = sub.add_parser("stats")
    st.add_argument("--out", default="runs/bench_audit_stats")
    st.add_argument("--patients", type=lambda t: [int(v) for v in t.split(",")], default=[200, 400, 800])
    st.add_argument("--gaps", type=lambda t: [float(v) for v in t.split(",")], default=[0.0, 0.05, 0.1, 0.15])
    st.add_argument("--models", type=lambda t: t.split(","), default=["flip", "margin"],
                    help="how the planted gap is made (simulated_predictions)")
    st.add_argument("--seeds", type=int, default=40)
    st.add_argument("--boot", type=int, default=50, help="bootstrap resamples (CIs are not used here)")
    st.add_argument("--permutations", type=int, default=2000)
    st.add_argument("--attributes", default="sex,age", help="audited columns (the primary family's groups)")
    st.add_argument("--primary-attributes", default="", help="pre-specified primary attributes (default: all)")
    st.add_argument("--target", default="sex=F", help="the group whose accuracy is lowered: sex=F or an age band "
                    "such as age=72-86 (the price of sharing alpha by attribute)")
    st.add_argument("--threads", type=int, default=1)
    st.set_defaults(func=stats)
    sc = sub.add_parser("scores")
    sc.add_argument("--out", default="runs/bench_audit_scores")
    sc.add_argument("--patients", type=lambda t: [int(v) for v in t.split(",")], default=[400])
    sc.add_argument("--gap", type=float, default=0.1)
    sc.add_argument("--models", type=lambda t: t.split(","), default=["margin", "flip"])
    sc.add_argument("--seeds", type=int, default=150)
    sc.add_argument("--permutations", type=int, default=300)
    sc.add_argument("--threads", type=int, default=1)
    sc.set_defaults(func=scores)
    fa = sub.add_parser("families")
    fa.add_argument("--out", default="runs/bench_audit_families")
    fa.add_argument("--patients", type=int, default=400)
    fa.add_argument("--gaps", type=lambda t: [float(v) for v in t.split(",")], default=[0.1])
    fa.add_argument("--models", type=lambda t: t.split(","), default=["margin", "flip"])
    fa.add_argument("--seeds", type=int, default=300)
    fa.add_argument("--first-seed", type=int, default=1000, help="choose on seeds the reported tables do not use")
    fa.add_argument("--permutations", type=int, default=1000)
    fa.add_argument("--threads", type=int, default=1)
    fa.set_defaults(func=families)
    ce = sub.add_parser("ceiling")
    ce.add_argument("--out", default="runs/bench_audit_ceiling")
    ce.add_argument("--patients", type=lambda t: [int(v) for v in t.split(",")], default=[200, 400, 800])
    ce.add_argument("--gaps", type=lambda t: [float(v) for v in t.split(",")], default=[0.05, 0.1, 0.15])
    ce.add_argument("--pair-alpha", type=float, default=0.05 / 8,
                    help="the p-value the default family asks of sex=F's balanced-accuracy test (the stats run's "
                         "pair_first_step_p_accuracy)")
    ce.add_argument("--reps", type=int, default=200_000)
    ce.add_argument("--threads", type=int, default=1)
    ce.set_defaults(func=ceiling)
    e = sub.add_parser("experiment")
    e.add_argument("--bank", default="runs/demo/bank.h5")
    e.add_argument("--cohort", default="runs/demo/cohort/cohort.csv")
    e.add_argument("--task", default="aml")
    e.add_argument("--out", default="runs/bench_audit_exp")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=experiment)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # numpy's BLAS: threads beyond the free cores slow the small matmuls down 2-3x
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
