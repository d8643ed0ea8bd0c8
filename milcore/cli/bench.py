"""``milcore bench``: benchmark aggregators (beside torchmil), bank I/O and extraction.

``milcore bench aggregators --bank B --cohort C --task T --models abmil,amil,... --out DIR`` cross-validates
every model on the same patient-level splits and seeds and writes ``DIR/bench.json``, ``DIR/table.md`` and
``DIR/report.html``/``report.md`` (accuracy-vs-cost plots). ``synthetic`` and ``bloodmnist-bags`` build their
cohorts first; ``io`` and ``extract`` run the bank and extraction benchmark scripts; ``all`` runs every suite
at its CPU size into ``benchmarks/results/<date>/``.

``bench aggregators ... --fold K`` runs only outer fold K of every model and seed (one task of a job array);
``milcore report merge`` joins such folders into the folder of the whole benchmark (``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

HELP = "benchmark aggregators, bank I/O and extraction side by side"

log = logging.getLogger("milcore")


#: ``BenchSpec`` fields, training options (``BENCH_TRAIN`` fields) and tuning options (``TuneSpec`` fields)
#: given as flags by the suites that train.
BENCH_OPTIONS = ("models", "peers", "folds", "seeds", "workers")
BENCH_TRAIN_OPTIONS = ("epochs", "patience", "lr", "batch_instances", "instance_dropout", "input_norm", "amp",
                       "device")  # fmt: skip
TUNE_OPTIONS = ("trials", "inner_folds", "metric", "prune", "min_gain", "min_gain_se", "confirm")
#: Option strings of the tuning options whose field name is not the flag (the others: ``--inner-folds``).
TUNE_FLAGS = {"trials": "--tune", "metric": "--tune-metric", "prune": "--tune-prune", "min_gain": "--tune-min-gain",
              "min_gain_se": "--tune-min-gain-se", "confirm": "--tune-confirm"}  # fmt: skip


def _training_options(p: argparse.ArgumentParser) -> None:
    from milcore.bench.config import BENCH_TRAIN, BenchSpec
    from milcore.cli._types import FOLDS_HELP, add_config_options, int_at_least

    add_config_options(p, BenchSpec, BENCH_OPTIONS, metavars={"models": "NAMES", "peers": "NAMES", "seeds": "S,T"},
                       helps={"models": "our aggregators, comma-separated names or patterns ('milcore models' lists "
                                        "them; * is every registered aggregator)",
                              "workers": "worker processes training in parallel, one torch thread each (0: one per "
                                         "available core; 1: this process only)",
                              "peers": "torchmil models run beside ours: abmil,dsmil,transmil or none (torchmil's "
                                       "TransMIL trains at a few bags/s on CPU)",
                              "folds": FOLDS_HELP, "seeds": "comma-separated seeds"})  # fmt: skip
    add_config_options(p, BENCH_TRAIN, BENCH_TRAIN_OPTIONS, metavars={"instance_dropout": "FRACTION"},
                       helps={"epochs": "maximum epochs per fit",
                              "input_norm": "standardise features with each training fold's statistics (real-cell "
                                            "features need it)"})  # fmt: skip
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads, shared by the worker processes (default: torch's)")  # fmt: skip
    from milcore.bench.config import TuneSpec

    # keep_unset: an option left unset is None, so that a tuning option given without --tune can be refused
    add_config_options(p, TuneSpec, TUNE_OPTIONS, flags=TUNE_FLAGS, keep_unset=True,
                       metavars={"trials": "N"},
                       helps={"trials": "also tune every model with N Optuna trials per outer fold (nested "
                                        "patient-level CV; the same budget for every model; 0: no tuning)",
                              "inner_folds": "inner folds of the tuning's nested CV",
                              "metric": "what the tuning optimises (pooled inner out-of-fold predictions)",
                              "prune": "median pruning of unpromising trials after each inner fold",
                              "min_gain": "a trial replaces the defaults only when it beats them by this much in "
                                          "the inner CV",
                              "min_gain_se": "... and by this many standard errors of its gain (paired "
                                             "bootstrap of the inner patients; 1: the one-standard-error rule, "
                                             "0: off)",
                              "confirm": "... and again when it and the defaults are retrained on fresh inner "
                                         "folds (another patient split and seed)"})  # fmt: skip
    p.add_argument("--search", action="append", default=None, metavar="[MODEL.]KEY=SPEC",
                   help="restrict the tuning's search space: VALUE fixes, LOW:HIGH narrows, A,B,C picks choices; "
                        "KEY is a shared dimension (lr, weight_decay, dropout, instance_dropout) or, after MODEL., "
                        "one the aggregator declares ('milcore models NAME'); repeatable")  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``bench`` subcommand and its suites."""
    from milcore.bench.config import BenchSpec
    from milcore.cli._types import add_config_options

    parser = subparsers.add_parser("bench", help=HELP, description=__doc__.splitlines()[0], parents=parents)
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", parser_class=type(parser))
    sub.required = True

    p = sub.add_parser("aggregators", parents=parents, help="aggregators (and torchmil peers) on one bank")
    p.add_argument("--bank", required=True, help="feature bank (.h5 or .zarr)")
    p.add_argument("--cohort", required=True, help="cohort table with a bag-id and a label column")
    p.add_argument("--task", required=True, metavar="COLUMN", help="label column")
    add_config_options(p, BenchSpec, ("ood_site", "site_column", "cells"), metavars={"ood_site": "S"},
                       helps={"ood_site": "hold this site out of CV and report it (OOD)",
                              "site_column": "cohort column of the site",
                              "cells": "instance ground truth (default: cells.csv beside the cohort)"})  # fmt: skip
    add_config_options(p, BenchSpec, ("fold",), metavars={"fold": "K"},
                       helps={"fold": "run only fold K (0 .. --folds - 1) of every model and seed into --out, e.g. one "
                                      "task of a job array; join the folds with 'milcore report merge'"})  # fmt: skip
    _training_options(p)
    _out_options(p, required=True)
    p.set_defaults(func=run)

    for name, text in (("synthetic", "synthetic AML/ALL/anemia cohorts, witness rates 1-20%%, bags of 10-2,000"),
                       ("bloodmnist-bags", "bags of real BloodMNIST cells with a planted cell type")):  # fmt: skip
        p = sub.add_parser(name, parents=parents, help=text)
        p.add_argument("--size", choices=("cpu", "tiny"), default="cpu", help="suite size (default cpu)")
        if name == "bloodmnist-bags":
            p.add_argument("--npz", default=None, help="bloodmnist.npz (default ../shared/data/bloodmnist)")
            p.add_argument("--witness", default="immature_granulocyte", help="cell type of positive bags")
            p.add_argument("--rate", type=float, default=0.05, help="witness fraction in positive bags (default 0.05)")
            p.add_argument("--witnesses", type=_count_range, default=None, metavar="LOW-HIGH",
                           help="rare-witness suite instead: bags of 20-60 cells holding LOW-HIGH witnesses, trained "
                                "on train-split bags and tested on test-split bags (e.g. 1-3)")  # fmt: skip
            p.add_argument("--encoder", default=None,
                           help="rare-witness suite: extraction encoder instead of the size's (its own input size)")
            p.add_argument("--weights", default=None,
                           help="rare-witness suite: weights of --encoder (e.g. from milcore encoder train)")
        _training_options(p)
        _out_options(p, required=True)
        p.set_defaults(func=run)

    for name, text in (("io", "bank I/O (benchmarks/bench_bank_io.py)"),
                       ("extract", "feature extraction (benchmarks/bench_extract.py)")):  # fmt: skip
        p = sub.add_parser(name, parents=parents, help=text)
        p.add_argument("--quick", action="store_true", help="the script's smoke size")
        _out_options(p, required=True)
        p.set_defaults(func=run)

    p = sub.add_parser("all", parents=parents, help="every suite at CPU size into benchmarks/results/<date>/")
    p.add_argument("--size", choices=("cpu", "tiny"), default="cpu", help="suite size (tiny: smoke run)")
    _training_options(p)
    _out_options(p, required=False)
    p.set_defaults(func=run)


def _count_range(text: str) -> tuple[int, int]:
    """``"1-3"`` -> ``(1, 3)``; ``"2"`` -> ``(2, 2)``."""
    lo, _, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH whole numbers, e.g. 1-3, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def _out_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--out", required=required, default=None,
                   help="output folder" + ("" if required else " (default benchmarks/results/<date>)"))  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")


def _check_out(out: Path, overwrite: bool, create: bool = True) -> None:
    from feature_cache.errors import OutputExistsError, UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite to replace its results)")
    if create:
        out.mkdir(parents=True, exist_ok=True)


def _template(args: argparse.Namespace, bank: str = "", cohort: str = "", task: str = ""):
    from feature_cache.devices import resolve_device
    from feature_cache.errors import InvalidArgumentError
    from milcore.bench.aggregators import check_models
    from milcore.bench.config import BENCH_TRAIN, BenchSpec, TuneSpec, check_fold, expand_models
    from milcore.cli._types import config_values

    resolve_device(args.device)  # before any output exists
    models = expand_models(args.models)
    check_models(models, args.peers)
    train = BENCH_TRAIN.replace(**config_values(args, BENCH_TRAIN_OPTIONS))
    train = train.replace(min_epochs=min(train.min_epochs, train.epochs))
    tune = TuneSpec(**config_values(args, TUNE_OPTIONS), search=_search_options(getattr(args, "search", None)))
    spec = BenchSpec(bank=bank, cohort=cohort, task=task, train=train, tune=tune,
                     **config_values(args, BENCH_OPTIONS), ood_site=getattr(args, "ood_site", None),
                     site_column=getattr(args, "site_column", "site"), cells=getattr(args, "cells", None),
                     fold=getattr(args, "fold", None))  # fmt: skip
    check_fold(spec)  # before any output exists
    given = [TUNE_FLAGS.get(n, "--" + n.replace("_", "-")) for n in config_values(args, TUNE_OPTIONS) if n != "trials"]
    if tune.search:
        given.append("--search")
    if given and not tune.trials:  # a tuning option alone would be ignored: the user expects tuned rows
        raise InvalidArgumentError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} how the models are "
                                   "tuned: pass --tune N as well")  # fmt: skip
    if tune.trials:
        from milcore.bench.tune import check_tune_spec

        check_tune_spec(spec.replace(models=models))  # before any output exists
    return spec


def _search_options(values: list[str] | None) -> dict[str, str]:
    """``--search [MODEL.]KEY=SPEC`` options -> ``{"[MODEL.]KEY": "SPEC"}`` (each key once)."""
    from feature_cache.errors import InvalidArgumentError

    out: dict[str, str] = {}
    for text in values or []:
        key, sep, spec = text.partition("=")
        if not sep or not key.strip() or not spec.strip():
            raise InvalidArgumentError(f"--search {text}: expected [MODEL.]KEY=SPEC, e.g. abmil.embed_dim=64:256")
        if key.strip() in out:
            raise InvalidArgumentError(f"--search {key.strip()}: given twice")
        out[key.strip()] = spec.strip()
    return out


def run(args: argparse.Namespace) -> int:
    """Run the chosen suite; returns the exit code."""
    import torch

    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, experiments) keep their setting


def _run(args: argparse.Namespace) -> int:
    from milcore.bench.report import markdown_table, write_outputs

    if args.suite in ("io", "extract"):
        from milcore.bench.suites import script_suite

        out = Path(args.out)
        _check_out(out, args.overwrite)
        return script_suite(args.suite, out, args.quick)
    spec = _template(args, getattr(args, "bank", ""), getattr(args, "cohort", ""), getattr(args, "task", ""))
    if args.suite == "bloodmnist-bags":
        from milcore.bench.suites import bloodmnist_npz

        args.npz = str(bloodmnist_npz(args.npz))  # before any output exists
        if args.witnesses is not None:
            from milcore.bench.rare_witness import check_rare_options

            check_rare_options(args.witness, args.witnesses, encoder=args.encoder, weights=args.weights)
        elif args.encoder is not None or args.weights is not None:
            from feature_cache.errors import InvalidArgumentError

            raise InvalidArgumentError("--encoder/--weights: only for the rare-witness suite (--witnesses LOW-HIGH)")
    out = Path(args.out) if args.out else Path("benchmarks/results") / time.strftime("%Y-%m-%d")
    _check_out(out, args.overwrite, create=args.suite != "aggregators")
    if args.suite == "aggregators":
        from milcore.bench.aggregators import run_benchmark

        result = run_benchmark(spec)  # reads and checks bank, cohort and folds first; --out is written at the end
        paths = write_outputs(result, out)
        print(markdown_table(result), end="")
        log.info("wrote %s, %s and %s (%.0f s)", paths["json"], paths["table"], paths["html"], result["seconds"])
        if spec.fold is not None:
            log.info("fold %d of %d done; join the folds with: milcore report merge BENCH_0 ... BENCH_%d --out BENCH",
                     spec.fold, spec.folds, spec.folds - 1)  # fmt: skip
        return _failed_code(result)
    from milcore.bench.suites import bloodmnist_suite, synthetic_suite

    if args.suite == "synthetic":
        results = synthetic_suite(out, spec, size=args.size, device=args.device)
        for name, result in results.items():
            print(f"## {name}\n\n{markdown_table(result)}")
        return max((_failed_code(r) for r in results.values()), default=0)
    if args.suite == "bloodmnist-bags":
        if args.witnesses is not None:
            from milcore.bench.rare_witness import rare_witness_suite

            result = rare_witness_suite(out, spec, size=args.size, npz=args.npz, witness=args.witness,
                                        witnesses=args.witnesses, device=args.device, encoder=args.encoder,
                                        weights=args.weights)  # fmt: skip
        else:
            result = bloodmnist_suite(out, spec, size=args.size, npz=args.npz, witness=args.witness, rate=args.rate,
                                      device=args.device)  # fmt: skip
        print(markdown_table(result))
        return _failed_code(result)
    return _run_all(out, spec, args)


def _failed_code(result: dict) -> int:
    """1 (with one line naming them) when some models failed; their rows say so in the outputs."""
    failed = result.get("failed") or []
    if failed:
        log.error("%d model(s) failed (see the table): %s", len(failed), ", ".join(failed))
        return 1
    return 0


def _run_all(out: Path, spec, args: argparse.Namespace) -> int:
    """Every suite; exit code 1 with a one-line summary of the failed suites when any failed."""
    from milcore.bench.suites import run_all

    outcomes = run_all(out, spec, size=args.size, device=args.device)
    print((out / "README.md").read_text())
    log.info("wrote %s and %s", out / "README.md", out / "summary.json")
    failed = [o for o in outcomes if o.status == "failed"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    if skipped:
        log.warning("skipped: %s", "; ".join(f"{o.suite} ({o.detail})" for o in skipped))
    if failed:
        log.error("%d of %d suites failed: %s", len(failed), len(outcomes),
                  "; ".join(f"{o.suite} ({o.detail})" for o in failed))  # fmt: skip
        return 1
    return 0
