"""Cell sources: crop folders, smear field images (with cell detection), whole slides, synthetic cohorts.

Every source implements :class:`BagSource` (``bag_ids()``, ``iter_cells(bag_id)``, ``read_bag``,
``failures``) and is built by kind with :func:`create_source`. Importing this package is cheap:
each kind's module (and its heavy imports, e.g. OpenSlide) loads on first use.
"""

from feature_cache.sources.base import UNKNOWN_COORD, BagSource, Cell, CellBatch, SourceFailure
from feature_cache.sources.registry import (
    BUILTIN_SOURCES,
    create_source,
    get_source_class,
    list_sources,
    register_source,
)

__all__ = [
    "BUILTIN_SOURCES",
    "UNKNOWN_COORD",
    "BagSource",
    "Cell",
    "CellBatch",
    "SourceFailure",
    "create_source",
    "get_source_class",
    "list_sources",
    "register_source",
]
