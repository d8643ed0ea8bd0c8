"""Trust-layer targets on the synthetic AML cohort (issue 16) and how similar-case search scales.

``targets``: per seed, a training cohort and a held-out cohort are drawn at the feature level from one
extracted synthetic AML bank (``morphology`` encoder; cells pooled by kind exactly as
``benchmarks/bench_audit.py`` does, diagnostic-cell rates log-normal around 0.06, bag sizes around 100).
ABMIL (dropout 0.25, so MC-dropout is available; standardised inputs; 15 epochs) is cross-validated on the
120-patient training cohort with ``train_run`` (5 folds); the run's fold ensemble predicts the 100 held-out
patients with ``predict``
(entropy, least confidence, fold-ensemble disagreement, MC-dropout); the run's similar-case index retrieves
the 5 most similar training patients of every held-out patient. Measured per seed:

* AURC of every uncertainty score on the held-out patients, beside a random ranking's (the error rate);
* balanced accuracy at 80% coverage minus balanced accuracy at full coverage;
* how often the majority diagnosis of the 5 retrieved cases is the true one, beside the classifier's accuracy.

Targets (issue 16): the best score's AURC clearly below a random ranking's; +3 points of balanced accuracy
at 80% coverage (mean over seeds, with the spread); retrieval majority correct at least as often as the
classifier.

``scaling``: build and query time of the search backends (exact numpy, faiss flat, faiss IVF) against
the index size, with the IVF recall@10 against the exact neighbours, on clustered random vectors.

    python benchmarks/bench_trust.py targets --out runs/bench_trust --seeds 5
    python benchmarks/bench_trust.py scaling --out runs/bench_trust_scaling --sizes 1000,10000,100000,300000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("milcore.bench")
HERE = Path(__file__).resolve().parent


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _publish(args: argparse.Namespace, name: str, result: dict) -> None:
    """Copy the result to ``--results/NAME.json`` (``benchmarks/results/trust/`` by default; ``''``: no copy)."""
    if not args.results:
        return
    path = Path(args.results) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float))
    log.info("wrote %s", path)


# ----------------------------------------------------------------------------- targets
def one_seed(pools, root: Path, seed: int, args: argparse.Namespace) -> dict:
    """Draw, cross-validate, predict the held-out cohort, retrieve; the row of one seed."""
    from milcore.crossval import train_run
    from milcore.data.store import open_bags
    from milcore.prediction import predict
    from milcore.training.config import RunSpec, TrainConfig
    from milcore.trust.retrieval import CENTER, VOTE, VOTES, build_index, similar_cases
    from milcore.trust.uncertainty import selective_summary

    t0 = time.perf_counter()
    folder = root / f"s{seed}"
    train_bank, train_cohort = pools.draw_cohort(folder / "train", args.train_patients, seed, 1.0)
    test_bank, test_cohort = pools.draw_cohort(folder / "test", args.test_patients, seed + 10_000, 1.0)
    spec = RunSpec(bank=str(train_bank), cohort=str(train_cohort), task="aml", folds=args.folds, seed=seed, n_boot=200)
    config = TrainConfig(model="abmil", model_args={"dropout": args.dropout}, epochs=args.epochs,
                         patience=args.patience, lr=1e-3, input_norm="standardize", device="cpu", seed=seed,
                         num_workers=0)  # fmt: skip
    cv = train_run(spec, config, folder / "run", overwrite=True)
    t_train = time.perf_counter() - t0
    new = predict(folder / "run", test_bank, cohort=test_cohort, task="aml", device="cpu", n_boot=200)
    held = selective_summary(new.table.labels, new.table.proba, new.uncertainty)
    t1 = time.perf_counter()
    index = build_index(folder / "run", device="cpu")
    t_index = time.perf_counter() - t1
    bags = open_bags(test_bank, test_cohort, "aml")
    t2 = time.perf_counter()
    matches = similar_cases(index, folder / "run", bags, k=5, device="cpu")
    t_query = time.perf_counter() - t2
    truth = dict(zip(bags.bag_ids, bags.labels.tolist(), strict=True))
    pred_of = dict(zip(new.table.bag_ids, new.table.predicted.tolist(), strict=True))
    classes = list(new.table.classes)
    variants = {}  # every (centring, vote) pair, the library's default among them
    for center in (False, True):
        found = matches if center == CENTER else similar_cases(
            build_index(folder / "run", device="cpu", center=center), folder / "run", bags, k=5, device="cpu")
        for vote in VOTES:
            variants[f"{'centred' if center else 'raw'}/{vote}"] = float(np.mean(
                [classes.index(m.majority(vote)) == truth[m.bag_id] for m in found]))  # fmt: skip
    majority = np.asarray([classes.index(m.majority(VOTE)) == truth[m.bag_id] for m in matches])
    classifier = np.asarray([pred_of[m.bag_id] == truth[m.bag_id] for m in matches])
    from milcore.metrics.classification import balanced_accuracy

    y = np.asarray([truth[m.bag_id] for m in matches])
    row = {
        "seed": seed, "train_patients": args.train_patients, "test_patients": len(matches),
        "cv_balanced_accuracy": cv.metrics["balanced_accuracy"],
        "heldout": {k: {kk: v[kk] for kk in ("aurc", "random_aurc", "oracle_aurc", "at_coverage")}
                    for k, v in held["scores"].items()},
        "oof": {k: {kk: v[kk] for kk in ("aurc", "random_aurc", "at_coverage")}
                for k, v in cv.metrics["uncertainty"]["scores"].items()},
        "skipped": held["skipped"],
        "retrieval": {"majority_accuracy": float(majority.mean()), "classifier_accuracy": float(classifier.mean()),
                      "majority_balanced_accuracy": balanced_accuracy(
                          y, np.asarray([classes.index(m.majority()) for m in matches]), len(classes)),
                      "classifier_balanced_accuracy": balanced_accuracy(
                          y, np.asarray([pred_of[m.bag_id] for m in matches]), len(classes)),
                      "agreement": float(np.mean([classes.index(m.majority()) == pred_of[m.bag_id]
                                                  for m in matches])),
                      "default": f"{'centred' if CENTER else 'raw'}/{VOTE}", "variants": variants,
                      "index_patients": len(index), "index_cells": len(index.cell_owner),
                      "seconds_build": t_index, "seconds_query": t_query},
        "seconds_train": t_train, "seconds_total": time.perf_counter() - t0, "load_average": _load(),
    }  # fmt: skip
    best = min(row["heldout"], key=lambda k: row["heldout"][k]["aurc"])
    h = row["heldout"][best]
    log.info("seed %d: CV BA %.3f; held-out best %s AURC %.3f (random %.3f), BA %.3f -> %.3f at 80%%; retrieval "
             "%.3f vs classifier %.3f (%.0f s)", seed, row["cv_balanced_accuracy"], best, h["aurc"], h["random_aurc"],
             h["at_coverage"]["1"]["balanced_accuracy"], h["at_coverage"]["0.8"]["balanced_accuracy"],
             row["retrieval"]["majority_accuracy"], row["retrieval"]["classifier_accuracy"],
             row["seconds_total"])  # fmt: skip
    for p in folder.rglob("*.h5"):  # keep the disk small
        p.unlink()
    return row


def _ms(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of the per-seed differences ``a - b`` with its 95 % t interval over seeds (the seeds are the units)."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "sd": 0.0, "ci95": [mean, mean], "seeds": len(d)}
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return {"mean": mean, "sd": float(d.std(ddof=1)), "ci95": [mean - half, mean + half], "seeds": len(d)}


def summarize(rows: list[dict]) -> dict:
    """Per score: AURC vs random, the balanced-accuracy gain at 80% coverage; retrieval vs classifier; targets."""
    scores = [s for s in ("entropy", "least_confidence", "disagreement", "mc_dropout") if all(s in r["heldout"]
                                                                                             for r in rows)]
    per_score = {}
    for s in scores:
        aurc = [r["heldout"][s]["aurc"] for r in rows]
        rand = [r["heldout"][s]["random_aurc"] for r in rows]
        gain = [r["heldout"][s]["at_coverage"]["0.8"]["balanced_accuracy"]
                - r["heldout"][s]["at_coverage"]["1"]["balanced_accuracy"] for r in rows]  # fmt: skip
        oof = [r["oof"][s]["aurc"] / r["oof"][s]["random_aurc"] for r in rows if s in r["oof"]]
        per_score[s] = {"aurc": _ms(aurc), "random_aurc": _ms(rand),
                        "ratio_to_random": _ms([a / b for a, b in zip(aurc, rand, strict=True)]),
                        "below_random_in": int(sum(a < b for a, b in zip(aurc, rand, strict=True))),
                        "ba_gain_at_80": _ms(gain), "oof_ratio_to_random": _ms(oof) if oof else None}  # fmt: skip
    best = min(per_score, key=lambda s: per_score[s]["aurc"][0])
    b = per_score[best]
    maj = [r["retrieval"]["majority_accuracy"] for r in rows]
    clf = [r["retrieval"]["classifier_accuracy"] for r in rows]
    targets = {
        "best_score": best,
        "aurc_clearly_below_random": bool(b["ratio_to_random"][0] <= 0.8 and b["below_random_in"] == len(rows)),
        "ba_gain_at_80_at_least_3_points": bool(b["ba_gain_at_80"][0] >= 0.03),
        "retrieval_at_least_classifier": bool(np.mean(maj) >= np.mean(clf)),
    }
    retrieval = {"majority_accuracy": _ms(maj), "classifier_accuracy": _ms(clf),
                 "seeds_majority_at_least_classifier": int(sum(m >= c for m, c in zip(maj, clf, strict=True))),
                 "paired_difference": paired_difference(maj, clf)}  # fmt: skip
    names = [v for v in rows[0]["retrieval"].get("variants", {}) if all(v in r["retrieval"].get("variants", {})
                                                                       for r in rows)]  # fmt: skip
    retrieval["variants"] = {v: {"accuracy": _ms([r["retrieval"]["variants"][v] for r in rows]),
                                 "minus_classifier": _ms([r["retrieval"]["variants"][v] - c
                                                          for r, c in zip(rows, clf, strict=True)]),
                                 "seeds_at_least_classifier": int(sum(r["retrieval"]["variants"][v] >= c
                                                                      for r, c in zip(rows, clf, strict=True)))}
                             for v in names}  # fmt: skip
    return {"scores": per_score, "best": best, "retrieval": retrieval, "targets": targets, "seeds": len(rows)}


def targets(args: argparse.Namespace) -> int:
    """Run the seeds (resumable: finished seeds are read from rows.jsonl), summarise, save."""
    sys.path.insert(0, str(HERE))
    from bench_audit import CellPools, base_bank

    from milcore.report.bench_io import machine_info, save_bench

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    load_start = _load()
    cohort, bank = base_bank(root, args.base_patients, args.base_seed)
    pools = CellPools(cohort, bank)
    path = root / "rows.jsonl"
    done = {}
    if path.exists():
        done = {json.loads(line)["seed"]: json.loads(line) for line in path.read_text().splitlines()}
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if seed not in done:
            done[seed] = one_seed(pools, root, seed, args)
            with open(path, "a") as f:
                f.write(json.dumps(done[seed], default=float) + "\n")
        rows.append(done[seed])
    summary = summarize(rows)
    lines = [f"trust targets: synthetic AML (feature-level draws), {args.train_patients} training / "
             f"{args.test_patients} held-out patients, ABMIL dropout {args.dropout}, {args.folds}-fold CV, "
             f"{args.epochs} epochs, {len(rows)} seeds",
             "| score | held-out AURC (mean ± sd) | random AURC | AURC / random | below random in | BA gain at 80% "
             "coverage (points, mean ± sd) | out-of-fold AURC / random |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s, v in summary["scores"].items():
        oof = v["oof_ratio_to_random"]
        lines.append(f"| {s}{' (best)' if s == summary['best'] else ''} | {v['aurc'][0]:.3f} ± {v['aurc'][1]:.3f} | "
                     f"{v['random_aurc'][0]:.3f} | {v['ratio_to_random'][0]:.2f} ± {v['ratio_to_random'][1]:.2f} | "
                     f"{v['below_random_in']}/{len(rows)} | {100 * v['ba_gain_at_80'][0]:+.1f} ± "
                     f"{100 * v['ba_gain_at_80'][1]:.1f} | "
                     + (f"{oof[0]:.2f} ± {oof[1]:.2f}" if oof else "–") + " |")  # fmt: skip
    r = summary["retrieval"]
    lines.append(f"retrieval: majority of 5 similar cases correct {r['majority_accuracy'][0]:.3f} ± "
                 f"{r['majority_accuracy'][1]:.3f}, classifier {r['classifier_accuracy'][0]:.3f} ± "
                 f"{r['classifier_accuracy'][1]:.3f} (majority >= classifier in "
                 f"{r['seeds_majority_at_least_classifier']}/{len(rows)} seeds)")  # fmt: skip
    pd_ = r["paired_difference"]
    lines.append(f"retrieval minus classifier, paired by seed: {100 * pd_['mean']:+.2f} points, 95% CI "
                 f"[{100 * pd_['ci95'][0]:+.2f}, {100 * pd_['ci95'][1]:+.2f}] over {pd_['seeds']} seeds")  # fmt: skip
    for v, x in r["variants"].items():
        lines.append(f"  retrieval {v}: {x['accuracy'][0]:.3f} ± {x['accuracy'][1]:.3f}, minus classifier "
                     f"{100 * x['minus_classifier'][0]:+.1f} ± {100 * x['minus_classifier'][1]:.1f} points, >= "
                     f"classifier in {x['seeds_at_least_classifier']}/{len(rows)} seeds")  # fmt: skip
    lines.append("targets: " + ", ".join(f"{k}={v}" for k, v in summary["targets"].items()))
    result = {"benchmark": "trust_targets", "machine": machine_info(), "load_average_start": load_start,
              "args": {k: v for k, v in vars(args).items() if k != "func"}, "summary": summary, "rows": rows}
    save_bench(root, result, "\n".join(lines))
    _publish(args, args.name, result)
    return 0


# ----------------------------------------------------------------------------- scaling
def scaling(args: argparse.Namespace) -> int:
    """Build and query time of each search backend against the number of indexed vectors."""
    from milcore.report.bench_io import machine_info, save_bench
    from milcore.trust.search import ExactSearch, FaissSearch

    rng = np.random.default_rng(0)
    load_start = _load()
    rows = []
    for n in args.sizes:
        centres = rng.normal(size=(100, args.dim)).astype(np.float32) * 3
        x = centres[rng.integers(0, 100, n)] + rng.normal(size=(n, args.dim)).astype(np.float32)
        q = centres[rng.integers(0, 100, args.queries)] + rng.normal(size=(args.queries, args.dim)).astype(np.float32)
        truth = None
        for name, make in (("exact", lambda v: ExactSearch(v)), ("faiss", lambda v: FaissSearch(v)),
                           ("faiss-ivf", lambda v: FaissSearch(v, ivf=True))):  # fmt: skip
            if name not in args.backends:
                continue
            t0 = time.perf_counter()
            search = make(x)
            build = time.perf_counter() - t0
            t1 = time.perf_counter()
            _, idx = search.search(q, 10)
            query = time.perf_counter() - t1
            singles = []
            for i in range(min(20, args.queries)):  # median of single queries: robust to a busy machine
                t2 = time.perf_counter()
                search.search(q[i : i + 1], 10)
                singles.append(time.perf_counter() - t2)
            single = float(np.median(singles))
            if name == "exact":
                truth = idx
            recall = (float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, truth, strict=True)]))
                      if truth is not None else float("nan"))  # fmt: skip
            rows.append({"backend": name, "size": n, "dim": args.dim, "seconds_build": build,
                         "ms_per_query_batched": 1000 * query / args.queries, "ms_single_query": 1000 * single,
                         "recall_at_10": recall, "vector_mb": n * args.dim * 4 / 1e6,
                         "nlist": getattr(search, "nlist", None), "nprobe": getattr(search, "nprobe", None),
                         "load_average": _load()})  # fmt: skip
            log.info("%s n=%d: build %.3f s, %.3f ms/query (batched), %.3f ms single, recall@10 %.3f", name, n, build,
                     rows[-1]["ms_per_query_batched"], rows[-1]["ms_single_query"], recall)  # fmt: skip
            del search
    lines = [f"similar-case search scaling: {args.dim}-d clustered vectors, {args.queries} queries, k = 10",
             "| backend | vectors | MB | build (s) | ms / query (batch of queries) | ms (one query) | recall@10 |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['backend']} | {r['size']:,} | {r['vector_mb']:.0f} | {r['seconds_build']:.3f} | "
                     f"{r['ms_per_query_batched']:.3f} | {r['ms_single_query']:.2f} | {r['recall_at_10']:.3f} |")
    result = {"benchmark": "trust_search_scaling", "machine": machine_info(), "load_average_start": load_start,
              "args": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows}
    save_bench(args.out, result, "\n".join(lines))
    _publish(args, args.name, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("targets")
    t.add_argument("--out", default="runs/bench_trust")
    t.add_argument("--seeds", type=int, default=5)
    t.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + seeds - 1 (choose settings on other seeds than you report)")
    t.add_argument("--name", default="targets", help="result file name under --results")
    t.add_argument("--train-patients", type=int, default=120)
    t.add_argument("--test-patients", type=int, default=100)
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--dropout", type=float, default=0.25)
    t.add_argument("--folds", type=int, default=5)
    t.add_argument("--patience", type=int, default=5)
    t.add_argument("--base-patients", type=int, default=100)
    t.add_argument("--base-seed", type=int, default=100)
    t.add_argument("--threads", type=int, default=2)
    t.set_defaults(func=targets)
    s = sub.add_parser("scaling")
    s.add_argument("--out", default="runs/bench_trust_scaling")
    s.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")],
                   default=[1000, 10_000, 100_000, 300_000])  # fmt: skip
    s.add_argument("--dim", type=int, default=128)
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--backends", type=lambda v: v.split(","), default=["exact", "faiss", "faiss-ivf"],
                   help="comma-separated: exact, faiss, faiss-ivf (recall is against exact: keep it first)")
    s.add_argument("--name", default="scaling", help="result file name under --results")
    s.set_defaults(func=scaling)
    for p in (t, s):
        p.add_argument("--results", default=str(HERE / "results" / "trust"),
                       help="folder for a copy of the JSON result ('' for none)")
    args = parser.parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
