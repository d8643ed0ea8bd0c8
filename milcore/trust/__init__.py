"""The trust layer: what a hematologist needs before acting on a prediction.

- :mod:`~milcore.trust.uncertainty`: per-patient uncertainty (predictive entropy, fold-ensemble
  disagreement, MC-dropout where a model has dropout), risk-coverage curves, AURC, selective prediction
  and abstention (patients referred for manual review);
- :mod:`~milcore.trust.retrieval`: similar-case retrieval (an index of the fold models' embeddings of
  their training bags and of the training patients' top-attention cells; exact search in numpy, faiss
  beyond);
- :mod:`~milcore.trust.passport`: the model passport of a training run (``passport.json`` / ``.md``,
  schema in ``docs/passport.schema.json``);
- pixel-level explanations, morphological concepts and shortcut checks live beside them
  (``pixels``, ``concepts``, ``shortcuts``).

Layer: below ``prediction``/``explain`` (which use it), above ``training``. Submodules are imported on
use; this package imports nothing heavy.
"""
