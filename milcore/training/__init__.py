"""Training bag classifiers: configuration, the trainer, checkpoints, metrics and calibration."""
