"""Cross-validation of one training configuration: in memory (:func:`cross_validate`) or into a run folder.

The job behind ``milcore train``: folds from :mod:`milcore.data.splits`, one
:func:`~milcore.training.fold.fit_fold` per fold, pooled out-of-fold predictions and ``metrics.json``
(:mod:`~milcore.crossval.result`), and the run folder with its report and cell galleries
(:mod:`~milcore.crossval.run`, :mod:`~milcore.crossval.report`).
"""

from milcore.crossval.result import CVResult
from milcore.crossval.run import cross_validate, train_run

__all__ = ["CVResult", "cross_validate", "train_run"]
