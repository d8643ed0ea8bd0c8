"""``milcore audit shortcuts``: does anything other than the cells' morphology predict the label?

Registered under ``milcore audit`` by :func:`add_parser` (the hook lives in ``cli/audit.py``)::

    milcore audit shortcuts --run RUN [--cohort COHORT.csv] [--crops ROOT] [--out DIR] [--alpha A] ...
"""

from __future__ import annotations

import argparse
import logging

HELP = ("fit site, date, bag size, image size, colour statistics and the stored metadata alone with the run's "
        "patient-level folds; flag any that comes close to the aggregator")  # fmt: skip
OPTIONS = ("alpha", "min_share", "permutations", "max_crops", "seed", "ignore")

log = logging.getLogger("milcore")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``shortcuts`` under the ``audit`` sub-parsers."""
    from milcore.cli._types import add_config_options
    from milcore.trust.shortcut_config import ShortcutConfig

    p = sub.add_parser("shortcuts", parents=parents, help=HELP, description=HELP[0].upper() + HELP[1:] + ". Writes "
                       "shortcuts.json (read by the model passport: run 'milcore passport RUN' after) and "
                       "shortcuts.html/.md. Checks whose input is absent (no site or date column, no crops) are "
                       "skipped and named.")  # fmt: skip
    p.add_argument("--run", required=True, help="training run folder (out-of-fold predictions.csv, config.yaml)")
    p.add_argument("--cohort", default=None, help="cohort table with site/date/metadata columns (default: the run's)")
    p.add_argument("--crops", default=None, metavar="ROOT",
                   help="root of <bag_id>/<cell>.png crops for image size and colour (default: the cohort's folder "
                   "when it holds them)")  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default: the run folder, where the passport reads it)")
    add_config_options(p, ShortcutConfig, OPTIONS,
                       helps={"alpha": "significance level of each check's permutation test",
                              "min_share": "flag a significant check reaching this share of the model's gain over "
                                           "chance",
                              "ignore": "cohort columns left out of the checks (comma-separated; named as skipped)"},
                       metavars={"ignore": "COL,..."})  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``milcore audit shortcuts ...``; returns the exit code (0 also when a shortcut is flagged: it is a finding)."""
    from pathlib import Path

    from milcore.cli._types import config_values
    from milcore.trust.shortcuts import ShortcutConfig, check_shortcuts

    config = ShortcutConfig.from_dict(config_values(args, OPTIONS))
    result = check_shortcuts(args.run, args.cohort, args.crops, config, args.out)
    for c in result.checks:
        log.info("  %-16s balanced accuracy %.3f  p=%.4f  %s", c["name"], c["balanced_accuracy"], c["p_value"],
                 "FLAGGED" if c["flagged"] else "")  # fmt: skip
    for s in result.skipped:
        log.info("  %-16s skipped: %s", s["name"], s["reason"])
    (log.warning if result.flagged else log.info)("%s", result.headline())
    out = Path(args.out) if args.out else Path(args.run)
    log.info("shortcuts: %s/shortcuts.json (regenerate the passport: milcore passport %s)", out, args.run)
    return 0
