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


#: ``AuditConfig`` fields given as flags by ``audit`` and ``audit experiment`` (the rest: ``audit`` alone).
SHARED_AUDIT_OPTIONS = ("age_bands", "min_group_size", "alpha", "n_boot", "seed")
RUN_AUDIT_OPTIONS = ("attributes", "intersections", "n_perm", "correction", "primary_weights", "primary_metrics",
                     "primary_attributes", "alternative", "permute_within_class", "mde_power")
#: Flags named before the config convention (``milcore run`` experiments use them).
AUDIT_FLAGS = {"min_group_size": "--min-group", "n_boot": "--boot", "n_perm": "--permutations"}
#: ``ExperimentSpec`` fields and training options (``TrainConfig`` fields) of ``audit experiment``.
EXPERIMENT_OPTIONS = ("fractions", "seeds", "train_size", "test_fraction", "age")
EXPERIMENT_TRAIN_OPTIONS = ("model", "epochs", "patience", "lr", "device")


def _audit_options(p: argparse.ArgumentParser) -> None:
    from milcore.audit.config import AuditConfig
    from milcore.cli._types import add_config_options

    add_config_options(p, AuditConfig, SHARED_AUDIT_OPTIONS, flags=AUDIT_FLAGS, metavars={"age_bands": "LO-HI,..."},
                       helps={"min_group_size": "groups with fewer patients are reported as insufficient",
                              "seed": "seed (resampling; experiment: splits, weights)"})  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing audit in --out")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``audit`` subcommand and ``audit experiment``."""
    from milcore.audit.config import EXPERIMENT_TRAIN, AuditConfig, ExperimentSpec
    from milcore.cli._types import add_config_options

    p = subparsers.add_parser("audit", help=HELP, description=HELP + ".", parents=parents)
    p.add_argument("--run", help="training run (or prediction folder) with predictions.csv")
    p.add_argument("--cohort", help="cohort table with age/sex/site columns")
    p.add_argument("--out", help="output folder for audit.json, audit.md and audit.html")
    add_config_options(p, AuditConfig, RUN_AUDIT_OPTIONS, flags=AUDIT_FLAGS,
                       helps={"intersections": "also audit pairs such as sex x age",
                              "n_perm": "permutations per test",
                              "primary_metrics": "metrics of the primary family (single-attribute groups; a group "
                                                 "is flagged when any of its tests is)",
                              "alternative": "worse: is each group worse than the rest (one-sided); two-sided: "
                                             "does it differ either way",
                              "permute_within_class": "shuffle group membership within each true class",
                              "mde_power": "power of the minimum detectable effect beside every verdict",
                              "correction": "multiple-comparison correction within each family (westfall-young: "
                                            "step-down min-P on permutations shared by the primary family's tests; "
                                            "the secondary family then gets holm)",
                              "primary_weights": "share the primary family's alpha equally among its tests, or "
                                                 "among the audited attributes first"})  # fmt: skip
    _audit_options(p)
    p.set_defaults(func=run)
    sub = p.add_subparsers(dest="audit_command", metavar="{experiment,shortcuts}", parser_class=type(p))
    e = sub.add_parser("experiment", parents=parents, help="re-train under controlled sex imbalance and with each "
                       "age band left out; evaluate on fixed test sets",
                       description="Imbalance experiments: train the aggregator on training sets with controlled "
                       "female fractions (fixed size) and with each age band excluded, several seeds each; evaluate "
                       "on fixed female/male and age-band test sets.")  # fmt: skip
    e.add_argument("--bank", required=True, help="feature bank")
    e.add_argument("--cohort", required=True, help="cohort table with the label, sex and age columns")
    e.add_argument("--task", required=True, metavar="COLUMN", help="label column")
    e.add_argument("--out", required=True, help="output folder")
    add_config_options(e, ExperimentSpec, EXPERIMENT_OPTIONS,
                       helps={"fractions": "female fractions of the training set",
                              "seeds": "repetitions per condition",
                              "age": "run the age-band exclusion experiments"})  # fmt: skip
    add_config_options(e, EXPERIMENT_TRAIN, EXPERIMENT_TRAIN_OPTIONS,
                       helps={"model": "aggregator name ('milcore models' lists them)",
                              "epochs": "maximum epochs per training"})  # fmt: skip
    e.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="aggregator config override, e.g. embed_dim=256 (repeatable)")
    _audit_options(e)
    e.set_defaults(func=run_imbalance)
    from milcore.cli.shortcuts import add_parser as add_shortcuts  # issue 16: milcore audit shortcuts

    add_shortcuts(sub, parents)


def _config(args: argparse.Namespace, names: tuple[str, ...] = SHARED_AUDIT_OPTIONS):
    from milcore.audit.config import AuditConfig
    from milcore.cli._types import config_values

    return AuditConfig.from_dict(config_values(args, names))


def run(args: argparse.Namespace) -> int:
    """``milcore audit --run RUN --cohort COHORT --out DIR``."""
    from feature_cache.errors import UserError
    from milcore.audit.run import audit_run

    missing = [f"--{k}" for k in ("run", "cohort", "out") if not getattr(args, k)]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (or use 'milcore audit experiment ...')")
    config = _config(args, SHARED_AUDIT_OPTIONS + RUN_AUDIT_OPTIONS)
    audit = audit_run(args.run, args.cohort, args.out, config, overwrite=args.overwrite)
    for line in audit["summary"]["details"]:
        log.info("  %s", line)
    log.info("audit: %s/audit.html  %s/audit.md  %s/audit.json", args.out, args.out, args.out)
    return 0


def run_imbalance(args: argparse.Namespace) -> int:
    """``milcore audit experiment ...``."""
    from milcore.audit.config import EXPERIMENT_TRAIN, ExperimentSpec
    from milcore.audit.imbalance import run_imbalance_experiment
    from milcore.cli._types import config_values, parse_overrides

    train = EXPERIMENT_TRAIN.replace(**config_values(args, EXPERIMENT_TRAIN_OPTIONS))
    if args.model_arg:
        train = train.replace(model_args=parse_overrides(args.model_arg))
    spec = ExperimentSpec(bank=args.bank, cohort=args.cohort, task=args.task, train=train,
                          **config_values(args, EXPERIMENT_OPTIONS))  # fmt: skip
    result = run_imbalance_experiment(spec, _config(args), args.out, overwrite=args.overwrite)
    log.info("audit experiment: %d trainings in %.0f s", len(result["runs"]), result["seconds"])
    log.info("audit experiment: %s/audit.html  %s/audit.md  %s/audit.json", args.out, args.out, args.out)
    return 0
