"""Bags, packed batches (``x`` + ``ptr``), labelled bag stores, cohort tables, splits and prediction stores.

- :mod:`~milcore.data.bag`: ``Bag``, ``BagBatch`` (``x``, ``ptr``, derived index), ``collate_bags``;
- :mod:`~milcore.data.store`: :class:`FeatureStore` (a bank's bags with their labels and patient groups,
  in memory or streamed) and :func:`open_bags` (bank + cohort table -> store);
- :mod:`~milcore.data.cohort`: :class:`Cohort` and :func:`read_cohort` (labels outside the bank);
- :mod:`~milcore.data.splits`: patient-level stratified folds (:class:`Fold`, :func:`make_folds`);
- :mod:`~milcore.data.predictions`: prediction folders (``predictions.csv`` + ``attention.h5``);
- :mod:`~milcore.data.inputs`, :mod:`~milcore.data.ground_truth`: run inputs and instance ground truth.
"""

from milcore.data.bag import Bag, BagBatch, collate_bags
from milcore.data.cohort import Cohort, read_cohort
from milcore.data.splits import Fold, make_folds
from milcore.data.store import FeatureStore, open_bags

__all__ = ["Bag", "BagBatch", "Cohort", "FeatureStore", "Fold", "collate_bags", "make_folds", "open_bags",
           "read_cohort"]
