"""Shortcut detection on synthetic AML cohorts with and without a planted site-label confound (issue 16).

Per seed and condition: ``milcore synth --task aml --sites 5`` (5 classes, 5 sites; ``confounded`` adds
``--confound site:STRENGTH``, which sends that share of class k's patients to site k), ``toy``-encoder
extraction, a cross-validated ABMIL run (``train_run``), then ``check_shortcuts`` on the run (site, date,
bag size, image size, colour statistics, age, sex; the generator's ground-truth columns ``n_cells``,
``n_diagnostic``, ``witness_rate``, ``subtlety``, ``biased`` are ignored: a real cohort has no such column).

Targets (issue 16): the confounded cohort's ``site`` check flagged in >= 90 % of seeds; the unconfounded
cohort flagged (any check) in <= 10 % of seeds.

    python benchmarks/bench_shortcuts.py --out runs/bench_shortcuts --seeds 12

Each finished row is appended to ``<out>/rows.jsonl``; a rerun with the same settings reads the finished
(seed, condition) rows back instead of recomputing them (``--reuse-json FILE`` also takes the rows of an
earlier results JSON written with the same settings).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GROUND_TRUTH = ("n_cells", "n_diagnostic", "witness_rate", "subtlety", "biased")
log = logging.getLogger("milcore.bench")


def _milcore(*args: str) -> None:
    exe = Path(sys.executable).with_name("milcore")
    subprocess.run([str(exe), "-q", *args], check=True)


def one(root: Path, seed: int, strength: float, args: argparse.Namespace) -> dict:
    """Synthesize, extract, train, check; the row of one seed and condition."""
    from milcore.crossval import train_run
    from milcore.training.config import RunSpec, TrainConfig

    t0 = time.perf_counter()
    folder = root / f"{'conf' if strength else 'clean'}_s{seed}"
    if args.reuse_runs and (folder / "run" / "predictions.csv").is_file():
        return {**_check(folder, seed, strength, t0), "run_reused": True}
    synth = ["synth", str(folder / "cohort"), "--task", "aml", "--patients", str(args.patients), "--sites", "5",
             "--bag-median", str(args.bag_median), "--seed", str(seed), "--overwrite"]  # fmt: skip
    if strength:
        synth += ["--confound", f"site:{strength}"]
    _milcore(*synth)
    bank = folder / "bank.h5"
    _milcore("extract", "--source", "synthetic", "--input", str(folder / "cohort"), "--encoder", args.encoder, "--out",
             str(bank), "--workers", "0", "--overwrite")  # fmt: skip
    spec = RunSpec(bank=str(bank), cohort=str(folder / "cohort" / "cohort.csv"), task="aml", folds=args.folds,
                   seed=seed, n_boot=50)  # fmt: skip
    cfg = TrainConfig(model="abmil", epochs=args.epochs, patience=4, lr=1e-3, input_norm="standardize",
                      device="cpu", seed=seed, num_workers=0)  # fmt: skip
    train_run(spec, cfg, folder / "run", overwrite=True)
    return _check(folder, seed, strength, t0)


def _check(folder: Path, seed: int, strength: float, t0: float) -> dict:
    """``check_shortcuts`` on a finished run; the row."""
    from milcore.trust.shortcuts import ShortcutConfig, check_shortcuts

    t1 = time.perf_counter()
    result = check_shortcuts(folder / "run", config=ShortcutConfig(ignore=GROUND_TRUTH, seed=seed))
    checks = {c["name"]: c for c in result.checks}
    site = checks.get("site", {})
    return {"seed": seed, "confound": strength, "model_ba": round(result.model_balanced_accuracy, 4),
            "site_ba": site.get("balanced_accuracy"), "site_p_holm": site.get("p_holm"),
            "site_flagged": bool(site.get("flagged")), "flagged": result.flagged, "any_flagged": bool(result.flagged),
            "checks": {n: {k: c[k] for k in ("balanced_accuracy", "p_holm", "share_of_model", "flagged")}
                       for n, c in checks.items()},
            "skipped": [s["name"] for s in result.skipped],
            "seconds_pipeline": round(t1 - t0, 1), "seconds_check": round(time.perf_counter() - t1, 1)}  # fmt: skip


SETTINGS = ("strength", "patients", "bag_median", "folds", "epochs", "encoder", "test")
#: Settings older results were written with before the option existed (``test``: the significance test of the
#: checks; ``fixed_predictions``, labels shuffled against fixed out-of-fold predictions, was anti-conservative).
DEFAULTS = {"encoder": "toy", "test": "fixed_predictions"}
TEST = "pillai-background"  # milcore.trust.shortcuts.association_p, colour of the background around the cells


def _settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SETTINGS}


def _finished(path: Path, args: argparse.Namespace) -> dict[tuple[int, float], dict]:
    """Rows already computed with the same settings: ``path`` (JSON lines) and ``--reuse-json``'s rows."""
    found: dict[tuple[int, float], dict] = {}
    if args.reuse_json:
        old = json.loads(Path(args.reuse_json).read_text())
        if {k: old["args"].get(k, DEFAULTS.get(k)) for k in SETTINGS} == _settings(args):
            for row in old["rows"]:
                found[(int(row["seed"]), float(row["confound"]))] = {**row, "reused_from": str(args.reuse_json)}
        else:
            log.warning("%s: other settings; its rows are not reused", args.reuse_json)
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.pop("settings", None) == _settings(args):
                found[(int(row["seed"]), float(row["confound"]))] = row
    return found


def fixed_predictions_p(y: np.ndarray, pred: np.ndarray, n_classes: int, permutations: int, seed: int) -> float:
    """The earlier significance test, kept here for the comparison only: labels shuffled against fixed
    predictions. Invalid for out-of-fold predictions fitted on those labels (what the checks made), which is why
    the library replaced it with :func:`~milcore.trust.shortcuts.association_p`."""
    from milcore.trust.shortcuts import balanced_accuracy

    rng = np.random.default_rng(seed)
    observed = balanced_accuracy(y, pred, n_classes)
    shuffled = np.stack([rng.permutation(y) for _ in range(permutations)])  # (P, n)
    null = balanced_accuracy(shuffled, pred, n_classes)
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + permutations))


def null_simulation(sims: int, permutations: int, seed: int = 123) -> dict:
    """How often the checks flag signals unrelated to the label: ``sims`` cohorts of 60 patients (5 classes of 12,
    3 folds) with a random site, date, bag size, colour, age and sex; each check's p-value by the current test
    (:func:`~milcore.trust.shortcuts.association_p`) and by the old one (labels shuffled against the fixed
    out-of-fold predictions of the fitted signal), and the share of cohorts with any Holm-corrected p < 0.05."""
    from milcore.trust.shortcut_config import ShortcutConfig
    from milcore.trust.shortcuts import Signal, association_p, fit_signal, holm

    rng = np.random.default_rng(seed)
    config = ShortcutConfig(permutations=permutations)
    p = {"current": [], "fixed_predictions": []}
    names: list[str] = []
    t0 = time.perf_counter()
    n = 60

    def col(values: np.ndarray) -> np.ndarray:
        return values.astype(object).reshape(n, -1)

    for s in range(sims):
        y = rng.permutation(np.repeat(np.arange(5), 12))
        folds = rng.permutation(np.tile(np.arange(3), 20))
        signals = [Signal("site", col(rng.integers(0, 5, n).astype(str)), ("cat",), ("site",)),
                   Signal("date", col(rng.integers(0, 700, n).astype(float)), ("num",), ("date",)),
                   Signal("bag_size", col(rng.poisson(20, n).astype(float)), ("num",), ("n",)),
                   Signal("colour", col(rng.normal(size=(n, 6))), ("num",) * 6, tuple("abcdef")),
                   Signal("age", col(np.round(rng.normal(58, 16, n))), ("num",), ("age",)),
                   Signal("sex", col(rng.choice(["F", "M"], n)), ("cat",), ("sex",))]  # fmt: skip
        names = [g.name for g in signals]
        p["current"].append([association_p(g, y, 5, permutations, s * 10 + i) for i, g in enumerate(signals)])
        p["fixed_predictions"].append([fixed_predictions_p(y, fit_signal(g, y, folds, config), 5, permutations,
                                                           s * 10 + i) for i, g in enumerate(signals)])  # fmt: skip
    load = [round(x, 2) for x in os.getloadavg()]
    out: dict = {"sims": sims, "permutations": permutations, "patients": 60, "classes": 5,
                 "seconds": round(time.perf_counter() - t0, 1), "load_after": load}  # fmt: skip
    for test, rows in p.items():
        arr = np.asarray(rows)  # (sims, checks)
        out[test] = {"any_flagged_holm": float(np.mean([min(holm(r)) < 0.05 for r in rows])),
                     "per_check_p_below_0.05": dict(zip(names, np.mean(arr < 0.05, axis=0).round(4).tolist(),
                                                        strict=True))}  # fmt: skip
        per = ", ".join(f"{k} {v:.3f}" for k, v in out[test]["per_check_p_below_0.05"].items())
        print(f"{test:<20} cohorts flagged (any check, Holm p < 0.05): {out[test]['any_flagged_holm']:.3f}; "
              f"per check {per}", flush=True)  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_shortcuts")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--patients", type=int, default=60)
    p.add_argument("--bag-median", type=int, default=20)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--encoder", default="toy", help="toy: the models of unconfounded cohorts stay at chance; "
                   "morphology: they learn the cells, so 'close to the aggregator' means something there too")
    p.add_argument("--name", default="shortcuts", help="results file name (without .json)")
    p.add_argument("--results", default=str(HERE / "results" / "shortcuts"))
    p.add_argument("--reuse-json", default=None, help="an earlier results JSON whose rows (same settings) are reused")
    p.add_argument("--reuse-runs", action="store_true",
                   help="recheck the trained runs already under --out (e.g. after a change of the check) instead of "
                   "synthesizing, extracting and training again")  # fmt: skip
    p.add_argument("--null", type=int, default=0, metavar="N",
                   help="instead: N null cohorts (signals unrelated to the label), current vs old significance test")
    args = p.parse_args()
    args.test = TEST
    if args.null:
        out = null_simulation(args.null, 1000)
        Path(args.results).mkdir(parents=True, exist_ok=True)
        (Path(args.results) / "shortcuts_null.json").write_text(json.dumps(out, indent=1))
        return 0
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    done = _finished(root / "rows.jsonl", args)
    rows = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    for seed in range(args.seeds):
        for strength in (args.strength, 0.0):
            row = done.get((seed, strength))
            if row is None:
                row = one(root, seed, strength, args)
                row["load_after"] = [round(x, 2) for x in os.getloadavg()]
                with open(root / "rows.jsonl", "a") as fh:
                    fh.write(json.dumps({"settings": _settings(args), **row}) + "\n")
            rows.append(row)
            print(f"seed {seed} confound {strength:.1f}: model BA {row['model_ba']:.3f} site BA {row['site_ba']} "
                  f"p_holm {row['site_p_holm']} flagged {row['flagged']}", flush=True)  # fmt: skip
    conf = [r for r in rows if r["confound"]]
    clean = [r for r in rows if not r["confound"]]
    summary = {"confounded_site_flagged_rate": float(np.mean([r["site_flagged"] for r in conf])),
               "unconfounded_any_flagged_rate": float(np.mean([r["any_flagged"] for r in clean])),
               "unconfounded_site_flagged_rate": float(np.mean([r["site_flagged"] for r in clean])),
               "model_ba_mean": float(np.mean([r["model_ba"] for r in rows])),
               "site_ba_confounded_mean": float(np.mean([r["site_ba"] for r in conf])),
               "site_ba_unconfounded_mean": float(np.mean([r["site_ba"] for r in clean]))}  # fmt: skip
    summary["targets"] = {"confounded_flagged>=0.9": summary["confounded_site_flagged_rate"] >= 0.9,
                          "unconfounded_flagged<=0.1": summary["unconfounded_any_flagged_rate"] <= 0.1}  # fmt: skip
    print(f"\n{'condition':<14}{'seeds':>6}{'site flagged':>14}{'any flagged':>13}{'site BA':>9}{'model BA':>10}")
    for name, group in ((f"site:{args.strength:.1f}", conf), ("none", clean)):
        print(f"{name:<14}{len(group):>6}{np.mean([r['site_flagged'] for r in group]):>14.2f}"
              f"{np.mean([r['any_flagged'] for r in group]):>13.2f}{np.mean([r['site_ba'] for r in group]):>9.3f}"
              f"{np.mean([r['model_ba'] for r in group]):>10.3f}")  # fmt: skip
    load_after = [round(x, 2) for x in os.getloadavg()]
    print(f"targets: {summary['targets']}  load average before {load_before} after {load_after}")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "summary": summary, "rows": rows,
                                                    "load_before": load_before, "load_after": load_after},
                                                   indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
