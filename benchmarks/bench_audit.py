"""Power and false-alarm rate of ``milcore audit`` on planted biases, old vs new tests, and the experiment's wall time.

Tests compared (issue 19), on the same predictions: ``old`` is the audit before issue 19 (balanced accuracy as
the primary metric, group membership permuted over all patients, two-sided); ``new`` is the audit's
defaults (class-stratified permutations, one-sided "worse than the rest" tests), read with each candidate
primary metric (balanced accuracy, class-balanced Brier score, class-balanced log-loss: the primary family
each would have made, Holm over the single-attribute groups); the audit's default primary metric is the one
these tables measure as the most powerful.

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
OLD_TEST = {"primary_metric": "balanced_accuracy", "alternative": "two-sided", "permute_within_class": False,
            "test_metrics": ("balanced_accuracy", "macro_f1", "auroc", "ece"), "correction": "holm",
            "primary_weights": "tests"}
#: Primary metrics compared (each read from the new audit's p-values as the family it would have made).
CANDIDATES = ("balanced_accuracy", "balanced_brier", "balanced_log_loss")


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


def candidate_family(audit: dict, metric: str, group: str = "sex=F", correction: str | None = None) -> dict:
    """The primary family the audit would have had with ``metric`` as its primary metric, read from its p-values
    (corrected by ``correction``, default the audit's).

    Returns:
        ``flagged`` (``group`` flagged), ``any`` (any group flagged), ``tests``, and ``group``'s ``p``,
        ``gap`` and ``mde`` (its minimum detectable effect in that family).
    """
    from milcore.audit.statistics import adjust_pvalues, minimum_detectable_effect

    config = audit["config"]
    primary = config.get("primary_attributes") or config["attributes"]
    rows = [c for c in audit["comparisons"] if c["metric"] == metric and c["level"] == "attribute"
            and c["attribute"] in primary and c["p_value"] is not None]  # fmt: skip
    keys: dict[str, float] = {}
    for r in rows:
        keys.setdefault(r["test_key"], r["p_value"])
    adjusted = dict(zip(keys, adjust_pvalues(list(keys.values()), correction or config["correction"]), strict=True))
    flagged = {r["group"] for r in rows if adjusted[r["test_key"]] < config["alpha"] and r["worse"]}
    mine = next(r for r in rows if r["group"] == group)
    mde = minimum_detectable_effect(mine["null_sd"] if mine.get("null_sd") is not None else float("nan"),
                                    config["alpha"], len(keys), config["mde_power"],
                                    config["alternative"] == "two-sided")  # fmt: skip
    return {"flagged": group in flagged, "any": bool(flagged), "tests": len(keys), "p": adjusted[mine["test_key"]],
            "gap": mine["gap"], "mde": mde}  # fmt: skip


#: The audits compared on the same predictions (issue 19): the test before issue 19, then the class-stratified
#: one-sided Brier tests corrected by Westfall-Young step-down min-P on joint permutations, with the primary
#: family's alpha shared equally by test or by attribute. Holm on the same tests is read from the ``wy`` audit.
VARIANTS = {"old": OLD_TEST,
            "wy": {"primary_metric": "balanced_brier", "correction": "westfall-young", "primary_weights": "tests"},
            "wy_attr": {"primary_metric": "balanced_brier", "correction": "westfall-young",
                        "primary_weights": "attributes"}}  # fmt: skip


def audit_both(pred, classes: list[str], groups, seed: int, target: str = "sex=F", **overrides) -> dict:
    """Audit the same predictions with every test of :data:`VARIANTS`; the flags each would raise.

    ``female_flagged`` (the key of the stored results) says whether ``target`` (``sex=F`` unless another planted
    group is named) was flagged.

    ``candidates`` holds the Holm primary family of each candidate metric read from the ``wy`` audit's p-values
    (for the Brier score: Holm on the very permutations Westfall-Young used).
    """
    from milcore.audit.config import AuditConfig
    from milcore.audit.stratified import audit_predictions

    out: dict = {}
    for name, changes in VARIANTS.items():
        config = AuditConfig(**{**overrides, **changes, "seed": seed})
        t0 = time.perf_counter()
        audit = audit_predictions(pred, classes, groups, config) | {"config": config.to_dict()}
        seconds = time.perf_counter() - t0
        f = next(c for c in audit["comparisons"] if c["group"] == target and c["family"] == "primary")
        secondary = any(c["flagged"] for c in audit["comparisons"] + audit["parity"] if c["family"] == "secondary")
        out[name] = {"primary_metric": config.primary_metric, "female_flagged": f["flagged"],
                     "any_primary_flag": bool(audit["summary"]["primary_flagged"]),
                     "any_flag": bool(audit["summary"]["flagged_groups"]) or secondary,
                     "p_corrected": f["p_corrected"], "mde": f.get("mde"), "seconds": seconds}  # fmt: skip
        if name == "wy":
            out["candidates"] = {m: candidate_family(audit, m, target, correction="holm") for m in CANDIDATES}
            out["holm"] = {"female_flagged": out["candidates"]["balanced_brier"]["flagged"],
                           "any_flag": out["candidates"]["balanced_brier"]["any"] or secondary,
                           "mde": out["candidates"]["balanced_brier"]["mde"]}  # fmt: skip
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
              "old_test": OLD_TEST, "candidates": CANDIDATES, "summary": summary, "rows": rows}  # fmt: skip
    save_bench(root, result, "\n".join(lines))
    return 0


#: Columns of the power tables: F flagged by each test (Holm families of the candidate metrics read from the
#: Westfall-Young audit's p-values), and any flag of either family (the false-alarm rate on unbiased cohorts).
_COLUMNS = {"old: F flagged": ("old", "female_flagged"),
            **{f"Holm {m.replace('balanced_', 'bal. ')}: F flagged": ("candidates", m) for m in CANDIDATES},
            "WY Brier: F flagged": ("wy", "female_flagged"), "WY Brier by attribute: F flagged": ("wy_attr",
                                                                                                  "female_flagged"),
            "old: any flag": ("old", "any_flag"), "Holm Brier: any flag": ("holm", "any_flag"),
            "WY Brier: any flag": ("wy", "any_flag"), "WY by attribute: any flag": ("wy_attr", "any_flag")}  # fmt: skip
#: MDE columns (sex=F, 80% power): name -> (side, metric).
_MDES = {"MDE bal. acc. (Holm)": ("candidates", "balanced_accuracy"), "MDE Brier (Holm)": ("holm", None),
         "MDE Brier (WY)": ("wy", None), "MDE Brier (WY by attribute)": ("wy_attr", None)}  # fmt: skip


def _rates(rs: list[dict]) -> dict:
    out = {}
    for name, (side, key) in _COLUMNS.items():
        if side == "candidates":
            out[name] = float(np.mean([r["candidates"][key]["flagged"] for r in rs]))
        else:
            out[name] = float(np.mean([r[side][key] for r in rs]))
    for name, (side, key) in _MDES.items():
        mdes = np.asarray([np.nan if (v := (r[side][key] if key else r[side])["mde"]) is None else v for r in rs])
        out[name] = float(np.nanmean(mdes)) if np.isfinite(mdes).any() else None
    for side in VARIANTS:
        out[f"seconds_audit_{side}"] = float(np.mean([r[side]["seconds"] for r in rs]))
    return out


def _cell(entry: dict, key: str) -> str:
    return f"{entry[key]:.0%}"


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
                rows.append(row)
                log.info("%s", row)
    lines = [f"audit statistics alone (simulated predictions, 5 classes, {BASE_ACCURACY:.0%} correct outside the "
             f"planted group {args.target} ('F' in the columns); audited by {args.attributes}, primary "
             f"{args.primary_attributes or 'all'}; {args.seeds} seeds per row)", "",
             "| model | patients | planted gap | observed BA gap | " + " | ".join(_COLUMNS) + " | "
             + " | ".join(_MDES) + " |", "|---|---:|---:|---:|" + "---:|" * (len(_COLUMNS) + len(_MDES))]  # fmt: skip
    for r in rows:
        mdes = " | ".join("–" if r[k] is None else f"{r[k]:.3f}" for k in _MDES)
        lines.append(f"| {r['model']} | {r['patients']} | {r['planted_gap']:.2f} | {r['mean_observed_ba_gap']:+.3f} | "
                     + " | ".join(_cell(r, k) for k in _COLUMNS) + f" | {mdes} |")  # fmt: skip
    save_bench(args.out, {"benchmark": "audit_stats", "machine": machine_info(), "args": vars(args) | {"func": None},
                          "variants": VARIANTS, "candidates": CANDIDATES, "rows": rows}, "\n".join(lines))  # fmt: skip
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
