"""milcore: multiple-instance learning for patient-level blood-smear diagnosis.

The learning side of the engine: bags and batches (``milcore.data``), segment ops over ``ptr``
(``milcore.ops``), MIL aggregators (``milcore.models``), training, prediction, explanation,
bias audits, continual learning and the ``milcore`` command line. Importing this package is cheap:
heavy modules (torch, ...) are imported by the sub-modules that need them.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
