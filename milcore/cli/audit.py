"""``milcore audit``: age/sex/site bias audits of a run, and imbalance experiments.

Forms::

    milcore audit --run RUN --cohort COHORT.csv --out DIR [--age-bands 0-45,46-59,...] [--min-group N] ...
    milcore audit experiment --bank BANK --cohort COHORT.csv --task COLUMN --out DIR [--model NAME]
                             [--fractions 0,0.25,0.5,0.75,1] [--seeds N] [--train-size N] ...
"""

from __future__ import annotations

import argparse
import logging

HELP = "age/sex/site bias audits of a run, and imbalance experiments"

log = logging.getLogger("milcore")


def _audit_options(p: argparse.ArgumentParser) -> None:
    from milcore.cli._types import fraction, int_at_least

    p.add_argument("--age-bands", default=None, metavar="LO-HI,...",
                   help="inclusive age bands in years (default 0-45,46-59,60-71,72-86,87-130)")  # fmt: skip
    p.add_argument("--min-group", type=int_at_least(2), default=10,
                   help="groups with fewer patients are reported as insufficient (default 10)")  # fmt: skip
    p.add_argument("--alpha", type=fraction, default=0.05, help="family-wise significance level (default 0.05)")
    p.add_argument("--boot", type=int_at_least(10), default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed (resampling; experiment: splits, weights)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing audit in --out")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``audit`` subcommand and ``audit experiment``."""
    from milcore.cli._types import int_at_least

    p = subparsers.add_parser("audit", help=HELP, description=HELP + ".", parents=parents)
    p.add_argument("--run", help="training run (or prediction folder) with predictions.csv")
    p.add_argument("--cohort", help="cohort table with age/sex/site columns")
    p.add_argument("--out", help="output folder for audit.json, audit.md and audit.html")
    p.add_argument("--attributes", default="sex,age,site", help="columns to stratify by (default sex,age,site)")
    p.add_argument("--no-intersections", action="store_true", help="skip pairs such as sex x age")
    p.add_argument("--permutations", type=int_at_least(10), default=2000, help="permutations per test (default 2000)")
    p.add_argument("--correction", choices=("holm", "bonferroni", "bh"), default="holm",
                   help="multiple-comparison correction within each family (default holm)")  # fmt: skip
    _audit_options(p)
    p.set_defaults(func=run)
    sub = p.add_subparsers(dest="audit_command", metavar="experiment", parser_class=type(p))
    e = sub.add_parser("experiment", parents=parents, help="re-train under controlled sex imbalance and with each "
                       "age band left out; evaluate on fixed test sets",
                       description="Imbalance experiments: train the aggregator on training sets with controlled "
                       "female fractions (fixed size) and with each age band excluded, several seeds each; evaluate "
                       "on fixed female/male and age-band test sets.")  # fmt: skip
    e.add_argument("--bank", required=True, help="feature bank")
    e.add_argument("--cohort", required=True, help="cohort table with the label, sex and age columns")
    e.add_argument("--task", required=True, metavar="COLUMN", help="label column")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--model", default="abmil", help="aggregator name (default abmil)")
    e.add_argument("--fractions", default="0,0.25,0.5,0.75,1", help="female fractions of the training set")
    e.add_argument("--seeds", type=int_at_least(1), default=3, help="repetitions per condition (default 3)")
    e.add_argument("--train-size", type=int_at_least(0), default=0,
                   help="training patients per condition (0: the largest size every condition can have)")  # fmt: skip
    e.add_argument("--test-fraction", type=float, default=0.3, help="share of patients held out as the test set")
    e.add_argument("--no-age", action="store_true", help="skip the age-band exclusion experiments")
    e.add_argument("--epochs", type=int_at_least(1), default=30, help="maximum epochs per training (default 30)")
    e.add_argument("--patience", type=int_at_least(1), default=8, help="early-stopping patience (default 8)")
    e.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _audit_options(e)
    e.set_defaults(func=run_experiment)


def _config(args: argparse.Namespace, **extra):
    from milcore.audit.config import AuditConfig, parse_age_bands

    kw = dict(min_group_size=args.min_group, alpha=args.alpha, n_boot=args.boot, seed=args.seed, **extra)
    if args.age_bands:
        kw["age_bands"] = parse_age_bands(args.age_bands)
    return AuditConfig(**kw)


def run(args: argparse.Namespace) -> int:
    """``milcore audit --run RUN --cohort COHORT --out DIR``."""
    from feature_cache.errors import UserError
    from milcore.audit.run import audit_run

    missing = [f"--{k}" for k in ("run", "cohort", "out") if not getattr(args, k)]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (or use 'milcore audit experiment ...')")
    attributes = tuple(a.strip() for a in args.attributes.split(",") if a.strip())
    config = _config(args, attributes=attributes, intersections=not args.no_intersections, n_perm=args.permutations,
                     correction=args.correction)  # fmt: skip
    audit = audit_run(args.run, args.cohort, args.out, config, overwrite=args.overwrite)
    for line in audit["summary"]["details"]:
        log.info("  %s", line)
    log.info("audit: %s/audit.html  %s/audit.md  %s/audit.json", args.out, args.out, args.out)
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    """``milcore audit experiment ...``."""
    from feature_cache.errors import UserError
    from milcore.audit.experiment import ExperimentSpec, run_imbalance_experiment

    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        raise UserError(f"--fractions: expected numbers separated by commas, got {args.fractions!r}") from None
    spec = ExperimentSpec(bank=args.bank, cohort=args.cohort, task=args.task, model=args.model, fractions=fractions,
                          seeds=args.seeds, train_size=args.train_size, test_fraction=args.test_fraction,
                          age=not args.no_age, epochs=args.epochs, patience=args.patience, lr=args.lr,
                          device=args.device)  # fmt: skip
    result = run_imbalance_experiment(spec, _config(args), args.out, overwrite=args.overwrite)
    log.info("audit experiment: %d trainings in %.0f s", len(result["runs"]), result["seconds"])
    log.info("audit experiment: %s/audit.html  %s/audit.md  %s/audit.json", args.out, args.out, args.out)
    return 0
