"""Training: configuration, the loop, and one fold as the unit of training.

- :mod:`~milcore.training.config`: :class:`TrainConfig` (and ``RunSpec``), validated and saved with every run;
- :mod:`~milcore.training.trainer`: :class:`Trainer` (``fit`` any module honouring the MILOutput contract,
  ``predict`` a store), :func:`check_model`;
- :mod:`~milcore.training.loop`: the epoch pieces shared with continual learning (bag order, mixed precision,
  the optimisation step with fp16 loss scaling);
- :mod:`~milcore.training.fold`: :func:`fit_fold` -> :class:`FoldResult` (fit, stop and calibrate on
  validation, predict the test part): what cross-validation, the imbalance experiment and the benchmark call;
- :mod:`~milcore.training.checkpoint`: safetensors weights + JSON card, verified on load.

Cross-validation over folds and the run folder are a job above this layer (:mod:`milcore.crossval`).
"""
