"""``milcore passport``: write a training run's model passport again (e.g. after an audit or a shortcut check)."""

from __future__ import annotations

import argparse
import logging

HELP = "write a training run's model passport (passport.json / passport.md) again"

log = logging.getLogger("milcore")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``passport`` subcommand."""
    p = subparsers.add_parser("passport", help=HELP, parents=parents,
                              description=HELP + ": intended use, data provenance (cohort, bank and encoder "
                              "fingerprints, cell counts), splits, metrics with CIs, calibration, uncertainty and "
                              "abstention, subgroup results (an audit of the run), shortcut findings "
                              "(RUN/shortcuts.json), software versions and known limitations. Every training run "
                              "writes one; run this after 'milcore audit' or 'milcore audit shortcuts'. A bank from "
                              "another encoder than the run's is refused.")  # fmt: skip
    p.add_argument("run", metavar="RUN", help="finished training run folder")
    p.add_argument("--bank", default=None, help="the bank the run was trained on, if it moved (default: the path "
                   "recorded in RUN/config.yaml); checked against the run's encoder and bank fingerprints")
    p.add_argument("--audit", default=None, metavar="DIR",
                   help="a subgroup audit of this run ('milcore audit --run RUN --out DIR'; default RUN/audit when "
                   "it exists)")  # fmt: skip
    p.add_argument("--coverage-target", type=float, action="append", default=[], metavar="X",
                   help="also give the coverage at which the out-of-fold balanced accuracy reaches X (0 < X <= 1; "
                   "repeatable; 0.90 and 0.95 are always given), with the --abstain-above U that gets there")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the passport; returns the exit code."""
    from pathlib import Path

    from milcore.trust.passport import passport_run

    passport = passport_run(args.run, bank=args.bank, audit=args.audit, coverage_targets=args.coverage_target)
    log.info("wrote %s and passport.md (subgroups: %s; shortcuts: %s)", Path(args.run) / "passport.json",
             passport["subgroups"]["status"], passport["shortcuts"]["status"])  # fmt: skip
    critical = [x["message"] for x in passport["limitations"] if x["severity"] == "critical"]
    for message in critical:
        log.warning("warning: %s", message)
    return 0
