"""Metrics, written once for the whole engine: the table, the functions, their uncertainty, calibration.

- :mod:`~milcore.metrics.table`: :data:`TABLE` (name, direction, labels, function, group-weighted
  function), :func:`scalar_metrics`, :data:`HEADLINE` and the other name lists;
- :mod:`~milcore.metrics.classification`: balanced accuracy, macro-F1, AUROC, ECE, confusion matrix,
  reliability curve, attention instance-AUROC (numpy, checked against scikit-learn);
- :mod:`~milcore.metrics.weighted`: the same metrics for many weightings of the patients at once (audit
  groups, bootstrap resamples, permutations), equalized-odds and demographic-parity differences;
- :mod:`~milcore.metrics.intervals`: bootstrap CIs, mean ± sd over folds, the CI of a mean;
- :mod:`~milcore.metrics.calibration`: softmax and temperature scaling with its search bounds.

Pure numpy (and scipy where a fit or a t quantile is needed); no torch import.
"""

from milcore.metrics.intervals import aggregate_folds, bootstrap_ci, mean_ci
from milcore.metrics.table import (
    CHANCE_METRICS,
    GROUP_METRICS,
    HEADLINE,
    PER_CLASS_METRICS,
    SCALAR_METRICS,
    TABLE,
    Metric,
    get_metric,
    higher_is_better,
    label,
    scalar_metrics,
)

__all__ = [
    "CHANCE_METRICS",
    "GROUP_METRICS",
    "HEADLINE",
    "PER_CLASS_METRICS",
    "SCALAR_METRICS",
    "TABLE",
    "Metric",
    "aggregate_folds",
    "bootstrap_ci",
    "get_metric",
    "higher_is_better",
    "label",
    "mean_ci",
    "scalar_metrics",
]
