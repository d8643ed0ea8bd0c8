"""Bags, packed batches (``x`` + ``ptr``), cohort tables and patient-level splits.

``Bag``, ``BagBatch`` and ``collate_bags`` are re-exported here; the cohort and split helpers live in
their own modules (``milcore.data.cohort``, ``milcore.data.splits``).
"""

from milcore.data.bag import Bag, BagBatch, collate_bags

__all__ = ["Bag", "BagBatch", "collate_bags"]
