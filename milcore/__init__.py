"""milcore: multiple-instance learning for patient-level blood-smear diagnosis, as a library.

The names a notebook needs, importable from ``milcore`` itself (each loaded on first use, so
``import milcore`` and ``milcore --help`` import neither torch nor numpy)::

    import milcore

    data = milcore.open_bags("bank.h5", "cohort.csv", task="aml")     # labelled bags (FeatureStore)
    cv = milcore.cross_validate(milcore.TrainConfig(model="abmil"), data, folds=5)
    print(cv.summary())                                               # CVResult: models, OOF predictions
    new = milcore.predict(cv, "new_bank.h5", cohort="new/cohort.csv", task="aml")
    audit = milcore.audit_run(cv, "cohort.csv")                       # by sex, age and site

One fold is :func:`fit_fold` (train, early-stop and calibrate on validation, predict the test part);
any ``nn.Module`` whose ``forward(x, ptr)`` returns a :class:`MILOutput` trains through it
(``model=``). The subpackages hold the rest: ``milcore.data``, ``milcore.models``, ``milcore.training``,
``milcore.metrics``, ``milcore.crossval``, ``milcore.prediction``, ``milcore.explain``, ``milcore.trust``
(uncertainty and abstention, similar cases, the model passport), ``milcore.audit``, ``milcore.continual``,
``milcore.bench`` and the ``milcore`` command line (``milcore.cli``).

Trust layer: ``cv.uncertainty`` / ``new.uncertainty`` hold per-patient uncertainty scores and
``risk_coverage(labels, proba, score)`` their risk-coverage curve; ``build_index(cv, data)`` and
``similar_cases(index, cv, bags)`` retrieve similar training cases; ``build_passport(run)`` is a
run folder's model passport.

``milcore.predict`` is the function; its module is ``milcore.prediction`` (a module and a function of one
name cannot share a package attribute). For the same reason the audit and the galleries are
:func:`audit_run` and :func:`explain_run` (their packages are ``milcore.audit`` and ``milcore.explain``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (the name is looked up there under the same name, except
#: ``open_bank``: the bank reader of :mod:`feature_cache.bank`).
_EXPORTS: dict[str, str] = {
    "open_bank": "feature_cache.bank",
    "read_cohort": "milcore.data.cohort",
    "Cohort": "milcore.data.cohort",
    "open_bags": "milcore.data.store",
    "FeatureStore": "milcore.data.store",
    "make_folds": "milcore.data.splits",
    "Fold": "milcore.data.splits",
    "TrainConfig": "milcore.training.config",
    "fit_fold": "milcore.training.fold",
    "FoldResult": "milcore.training.fold",
    "cross_validate": "milcore.crossval",
    "CVResult": "milcore.crossval",
    "predict": "milcore.prediction",
    "explain_run": "milcore.explain",
    "audit_run": "milcore.audit.run",
    "AuditConfig": "milcore.audit.config",
    "create_aggregator": "milcore.models",
    "list_aggregators": "milcore.models",
    "MILOutput": "milcore.models",
    "risk_coverage": "milcore.trust.uncertainty",
    "build_index": "milcore.trust.retrieval",
    "similar_cases": "milcore.trust.retrieval",
    "build_passport": "milcore.trust.passport",
}
_ALIASES = {"open_bank": "open_reader"}
#: Subpackages reachable as attributes without an explicit import (``milcore.metrics.TABLE``).
_SUBMODULES = ("audit", "bench", "cli", "continual", "crossval", "data", "explain", "losses", "metrics", "models",
               "ops", "prediction", "report", "training", "trust")  # fmt: skip

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562) and keep it."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'milcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES})
