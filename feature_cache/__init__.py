"""feature_cache: the image side of the engine and the feature bank.

Sub-packages: ``sources`` (cells from crop folders, smear fields, slides, the synthetic cohort),
``encoders`` (cell crops -> feature vectors) and ``bank`` (the on-disk CSR feature store).
This package never imports ``milcore``. Nothing heavy is imported here.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
