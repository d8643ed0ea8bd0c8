"""One fold: fit on the training part, stop and calibrate on the validation part, predict the test part.

:func:`fit_fold` is the one unit of training of the engine: the cross-validated run
(:func:`milcore.crossval.cross_validate`), the audit's imbalance experiment and the aggregator benchmark
all train through it, so the recipe (early stopping on validation only, temperature scaling fitted on
the validation bags, test predictions with per-cell attention) is written once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from milcore.metrics import scalar_metrics
from milcore.metrics.calibration import fit_temperature, softmax
from milcore.metrics.classification import expected_calibration_error
from milcore.training.config import TrainConfig
from milcore.training.trainer import ModelFactory, ModelOutputs, Trainer

if TYPE_CHECKING:
    from milcore.data.splits import Fold
    from milcore.data.store import FeatureStore


@dataclass
class FoldResult:
    """A trained, calibrated model and its predictions on the fold's test bags.

    Attributes:
        fold: the fold (bag ids of its training, validation and test parts).
        model: the trained module (best validation epoch), on the training device, in eval mode.
        temperature: fitted on the validation bags; divides the logits before the softmax.
        best_epoch: epoch of the kept weights (-1 when unknown, e.g. an old checkpoint).
        history: one dict per epoch (losses, validation metrics, seconds).
        stopped_early: whether patience ran out.
        test: the model's outputs on the test bags, in ``fold.test`` order (uncalibrated ``logits``,
            per-cell ``attention`` aligned with each bag's bank rows, ``embedding``).
        proba: (n_test, C) calibrated probabilities.
        labels: (n_test,) test labels (-1: unknown).
        seconds: ``fit`` (training incl. validation passes), ``validate`` (the validation passes),
            ``calibrate`` (validation predictions + temperature fit), ``test`` (test predictions).
        trainer: the trainer that made it (its device and batch settings predict other bags alike).
    """

    fold: Fold
    model: torch.nn.Module
    temperature: float
    best_epoch: int
    history: list[dict[str, float]]
    stopped_early: bool
    test: ModelOutputs
    proba: np.ndarray
    labels: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    trainer: Trainer | None = field(default=None, repr=False)

    @property
    def bag_ids(self) -> list[str]:
        """The test bags, in prediction order."""
        return list(self.fold.test)

    @property
    def metrics(self) -> dict[str, float]:
        """Every scalar metric of the calibrated test predictions (NaN where the labels do not define one)."""
        known = self.labels >= 0
        return scalar_metrics(self.labels[known], self.proba[known])

    def row(self) -> dict[str, Any]:
        """The fold's line of ``metrics.json["per_fold"]``: sizes, epochs, temperature, test metrics,
        and the ECE before temperature scaling."""
        known = self.labels >= 0
        fold = self.fold
        return {"fold": fold.index, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
                "best_epoch": self.best_epoch, "epochs_run": len(self.history), "temperature": self.temperature,
                **self.metrics, "ece_uncalibrated": expected_calibration_error(
                    self.labels[known], softmax(self.test.logits[known]))}  # fmt: skip

    def predict(self, store: FeatureStore, with_attention: bool = True) -> tuple[np.ndarray, ModelOutputs]:
        """Calibrated probabilities (B, C) and raw outputs of this fold's model on other bags."""
        trainer = self.trainer or Trainer(TrainConfig(device=str(next(self.model.parameters()).device)),
                                          store.dim, self.test.logits.shape[1])  # fmt: skip
        out = trainer.predict(self.model, store, with_attention=with_attention)
        return softmax(out.logits, self.temperature), out


def fold_result(trainer: Trainer, model: torch.nn.Module, data: FeatureStore, fold: Fold, temperature: float, *,
                best_epoch: int = -1, history: list[dict[str, float]] | None = None, stopped_early: bool = False,
                seconds: dict[str, float] | None = None, attention: bool = True) -> FoldResult:  # fmt: skip
    """The :class:`FoldResult` of a model already trained and calibrated for ``fold`` (e.g. a reloaded
    checkpoint): its predictions on the fold's test bags."""
    seconds = dict(seconds or {})
    test = data.view(fold.test)
    t0 = time.perf_counter()
    out = trainer.predict(model, test, with_attention=attention)
    seconds["test"] = time.perf_counter() - t0
    labels = test.labels if test.labels is not None else np.full(len(test), -1, dtype=np.int64)
    return FoldResult(fold, model, float(temperature), int(best_epoch), list(history or []), stopped_early, out,
                      softmax(out.logits, temperature), labels, seconds, trainer)  # fmt: skip


def fit_fold(config: TrainConfig, data: FeatureStore, fold: Fold, *,
             model: torch.nn.Module | ModelFactory | None = None, state_path: str | Path | None = None,
             log_dir: str | Path | None = None, desc: str | None = None,
             attention: bool = True) -> FoldResult:  # fmt: skip
    """Train on ``fold.train``, early-stop on ``fold.val``, fit the temperature on ``fold.val``, predict ``fold.test``.

    Args:
        config: how to train (``config.model`` names the registered aggregator unless ``model`` is given).
        data: labelled bags holding every bag of the fold (:func:`milcore.data.store.open_bags`); an aggregator
            that declares it uses coordinates gets them even when ``data`` was opened without.
        fold: bag ids of the three parts (:func:`milcore.data.splits.make_folds`, or any :class:`Fold`).
        model: a module to train instead of ``config.model`` (any ``nn.Module`` whose forward returns a
            :class:`~milcore.models.MILOutput`), or a factory ``(in_dim, num_classes) -> module`` called
            after seeding with ``config.seed``.
        state_path: resumable training state, saved after every epoch (resumed when it exists).
        log_dir: TensorBoard folder (with ``config.tensorboard``).
        desc: progress label.
        attention: also return the test bags' per-cell attention.

    Returns:
        The :class:`FoldResult`.

    Raises:
        UserError: unlabelled bags, or a fold naming bags the data lacks.
        InvalidArgumentError: the module breaks the MILOutput contract (on the first batch).
    """
    if data.labels is None:
        data.require_labels("fit_fold")
    if model is None and not data.with_coords:
        from milcore.models import aggregator_needs

        if aggregator_needs(config.model).coords:  # as milcore train does: the graph is built in cell space
            data = data.with_coordinates()
    trainer = Trainer(config, data.dim, data.num_classes)
    train, val = data.view(fold.train), data.view(fold.val)
    trainer.use_deterministic_algorithms()  # a one-off import per process, not part of the fit's time
    t0 = time.perf_counter()
    trained, fit = trainer.fit(train, val, model=model, state_path=state_path, log_dir=log_dir,
                               desc=desc or f"fold {fold.index}")  # fmt: skip
    t1 = time.perf_counter()
    temperature = fit_temperature(trainer.predict(trained, val, with_attention=False).logits, val.labels)
    seconds = {"fit": t1 - t0, "validate": fit.validate_seconds, "calibrate": time.perf_counter() - t1}
    return fold_result(trainer, trained, data, fold, temperature, best_epoch=fit.best_epoch, history=fit.history,
                       stopped_early=fit.stopped_early, seconds=seconds, attention=attention)  # fmt: skip
