"""Power and false-alarm rate of ``milcore audit`` on planted biases, and the imbalance experiment's wall time.

Power / false alarms. Rendering and encoding a fresh 400-patient cohort per seed costs minutes on CPU, so
the cohorts are re-drawn at the feature level from one extracted synthetic bank (``morphology`` encoder):
its cells are pooled by kind (each class's diagnostic cells, using ``cells.csv``; all non-diagnostic cells)
and every seed draws new patients exactly as ``milcore synth`` does (balanced classes, random sex, age
N(58, 16), log-normal bag sizes and diagnostic-cell rates; ``--bias sex=F:FACTOR`` scales the female
diseased patients' diagnostic-cell rate), writes a bank and a cohort table, cross-validates ABMIL with
``train_run`` and audits the out-of-fold predictions with ``audit_run``. A seed "flags" when the primary
family (balanced accuracy, single-attribute groups, Holm) flags ``sex=F``; any other primary or
secondary flag is counted as well.

    python benchmarks/bench_audit.py power --out runs/bench_audit            # calibrate, power, false alarms
    python benchmarks/bench_audit.py stats --out runs/bench_audit_stats      # the statistics alone, by cohort size
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


def one_seed(pools: CellPools, root: Path, patients: int, seed: int, factor: float, epochs: int) -> dict:
    """Draw, cross-validate and audit one cohort; returns the observed gap and the flags."""
    from milcore.audit.config import AuditConfig
    from milcore.audit.run import audit_run
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    t0 = time.perf_counter()
    folder = root / f"f{factor:g}_s{seed}"
    bank, cohort = pools.draw_cohort(folder, patients, seed, factor)
    spec = RunSpec(bank=str(bank), cohort=str(cohort), task="aml", folds=5, seed=seed, n_boot=100)
    config = TrainConfig(model="abmil", epochs=epochs, patience=6, device="cpu", seed=seed, num_workers=0)
    metrics = train_run(spec, config, folder / "run", overwrite=True).metrics
    t_train = time.perf_counter() - t0
    audit = audit_run(folder / "run", cohort, folder / "audit", AuditConfig(attributes=("sex", "age"), seed=seed),
                      overwrite=True, report=False)  # fmt: skip
    primary = [c for c in audit["comparisons"] if c["family"] == "primary"]
    sex_f = next(c for c in primary if c["group"] == "sex=F")
    row = {"factor": factor, "seed": seed, "patients": patients, "ba": metrics["balanced_accuracy"],
           "gap_F_minus_rest": sex_f["gap"], "p_corrected": sex_f["p_corrected"], "female_flagged": sex_f["flagged"],
           "primary_flags": [c["group"] for c in primary if c["flagged"]],
           "any_flags": audit["summary"]["flagged_groups"], "seconds_train": t_train,
           "seconds_audit": audit["seconds"]}  # fmt: skip
    log.info("factor %g seed %d: BA %.3f, F gap %+.3f, corrected p %.3g, flagged %s, flags %s (%.0f s)", factor, seed,
             row["ba"], row["gap_F_minus_rest"], row["p_corrected"], row["female_flagged"], row["any_flags"],
             time.perf_counter() - t0)  # fmt: skip
    for p in (folder / "run").rglob("*.h5"):  # keep the disk small: attention and banks are not needed later
        p.unlink()
    bank.unlink()
    return row


def power(args: argparse.Namespace) -> int:
    """Calibrate the bias factor, then measure power and false alarms over seeds."""
    from milcore.report.bench_io import machine_info, save_bench

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    cohort, bank = base_bank(root, args.base_patients, args.base_seed)
    pools = CellPools(cohort, bank)
    results_path = root / "rows.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["factor"], r["seed"])] = r
    plan = [(f, s) for s in range(args.seeds) for f in args.factors]  # seed-major: every factor advances together
    rows = []
    for factor, seed in plan:
        if (factor, seed) not in done:
            r = one_seed(pools, root, args.patients, seed, factor, args.epochs)
            with open(results_path, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            done[(factor, seed)] = r
        rows.append(done[(factor, seed)])
    summary = []
    for factor in args.factors:
        rs = [r for r in rows if r["factor"] == factor]
        gaps = np.asarray([r["gap_F_minus_rest"] for r in rs], dtype=float)
        summary.append(
            {
                "factor": factor,
                "seeds": len(rs),
                "mean_ba": float(np.mean([r["ba"] for r in rs])),
                "mean_gap_F": float(np.nanmean(gaps)),
                "sd_gap_F": float(np.nanstd(gaps, ddof=1)) if len(rs) > 1 else 0.0,
                "female_flag_rate": float(np.mean([r["female_flagged"] for r in rs])),
                "any_primary_flag_rate": float(np.mean([bool(r["primary_flags"]) for r in rs])),
                "any_flag_rate": float(np.mean([bool(r["any_flags"]) for r in rs])),
                # post hoc: the seeds whose trained model really shows a female gap of 10 points or more
                "seeds_gap_10": int(np.sum(gaps <= -0.10)),
                "female_flag_rate_gap_10": float(
                    np.mean([r["female_flagged"] for r, g in zip(rs, gaps, strict=True) if g <= -0.10])
                )
                if np.any(gaps <= -0.10)
                else None,
                "seconds_per_seed": float(np.mean([r["seconds_train"] + r["seconds_audit"] for r in rs])),
            }
        )
    lines = [f"audit power / false alarms: {args.patients} patients, ABMIL 5-fold CV, morphology features",
             "| female rate factor | seeds | mean BA | F gap (mean ± sd) | F flagged | any primary flag | any flag "
             "| seeds with F gap <= -0.10 | F flagged among them | s/seed |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s in summary:
        lines.append(f"| {s['factor']:g} | {s['seeds']} | {s['mean_ba']:.3f} | {s['mean_gap_F']:+.3f} ± "
                     f"{s['sd_gap_F']:.3f} | {s['female_flag_rate']:.0%} | {s['any_primary_flag_rate']:.0%} | "
                     f"{s['any_flag_rate']:.0%} | {s['seeds_gap_10']} | "
                     + ("–" if s["female_flag_rate_gap_10"] is None else f"{s['female_flag_rate_gap_10']:.0%}")
                     + f" | {s['seconds_per_seed']:.0f} |")  # fmt: skip
    result = {"benchmark": "audit_power", "machine": machine_info(), "args": vars(args) | {"func": None},
              "summary": summary, "rows": rows}  # fmt: skip
    save_bench(root, result, "\n".join(lines))
    return 0


def simulated_predictions(n: int, seed: int, gap: float, base: float = 0.85, classes: int = 5):
    """Labels, probabilities and cohort columns where women are classified correctly ``gap`` less often than men."""
    rng = np.random.default_rng([seed, 515])
    y = rng.integers(0, classes, n)
    sex = rng.choice(["F", "M"], n)
    age = np.clip(np.rint(rng.normal(58, 16, n)), 18, 90).astype(int)
    correct = rng.random(n) < np.where(sex == "F", base - gap, base)
    pred = np.where(correct, y, (y + rng.integers(1, classes, n)) % classes)
    logits = rng.normal(0, 0.6, (n, classes))
    logits[np.arange(n), pred] += 2.0
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba, {"sex": sex.astype(object), "age": age.astype(str).astype(object)}


def stats(args: argparse.Namespace) -> int:
    """Power of the audit's statistics alone: simulated predictions with a known female accuracy gap."""
    from milcore.audit.config import AuditConfig
    from milcore.audit.groups import build_groups
    from milcore.audit.stratified import audit_predictions
    from milcore.metrics.weighted import LabelledPredictions
    from milcore.report.bench_io import machine_info, save_bench

    rows = []
    classes = [f"c{i}" for i in range(5)]
    for n in args.patients:
        for gap in args.gaps:
            flags, anyflags, observed = [], [], []
            for seed in range(args.seeds):
                y, proba, cols = simulated_predictions(n, seed, gap)
                config = AuditConfig(attributes=tuple(args.attributes.split(",")), intersections=False,
                                     per_class=False, n_boot=100, seed=seed)  # fmt: skip
                audit = audit_predictions(LabelledPredictions(y, proba), classes, build_groups(cols, n, config), config)
                f = next(c for c in audit["comparisons"] if c["group"] == "sex=F" and c["family"] == "primary")
                flags.append(f["flagged"])
                anyflags.append(bool(audit["summary"]["flagged_groups"]))
                observed.append(f["gap"])
            rows.append({"patients": n, "planted_accuracy_gap": gap, "seeds": args.seeds, "attributes": args.attributes,
                         "mean_observed_ba_gap": float(np.mean(observed)), "female_flag_rate": float(np.mean(flags)),
                         "any_flag_rate": float(np.mean(anyflags))})  # fmt: skip
            log.info("%s", rows[-1])
    lines = ["audit statistics alone (simulated predictions, 5 classes, men 85% correct)",
             "| patients | planted gap | mean observed BA gap | seeds | F flagged | any flag |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['patients']} | {r['planted_accuracy_gap']:.2f} | {r['mean_observed_ba_gap']:+.3f} | "
                     f"{r['seeds']} | {r['female_flag_rate']:.0%} | {r['any_flag_rate']:.0%} |")  # fmt: skip
    save_bench(args.out, {"benchmark": "audit_stats", "machine": machine_info(), "rows": rows}, "\n".join(lines))
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
    p.set_defaults(func=power)
    st = sub.add_parser("stats")
    st.add_argument("--out", default="runs/bench_audit_stats")
    st.add_argument("--patients", type=lambda t: [int(v) for v in t.split(",")], default=[200, 400, 800, 1200])
    st.add_argument("--gaps", type=lambda t: [float(v) for v in t.split(",")], default=[0.0, 0.1])
    st.add_argument("--seeds", type=int, default=40)
    st.add_argument("--attributes", default="sex,age", help="audited columns (the primary family's groups)")
    st.add_argument("--threads", type=int, default=1)
    st.set_defaults(func=stats)
    e = sub.add_parser("experiment")
    e.add_argument("--bank", default="runs/demo/bank.h5")
    e.add_argument("--cohort", default="runs/demo/cohort/cohort.csv")
    e.add_argument("--task", default="aml")
    e.add_argument("--out", default="runs/bench_audit_exp")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=experiment)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
