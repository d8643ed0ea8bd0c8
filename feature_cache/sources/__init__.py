"""Cell sources: crop folders, smear field images (with cell detection), whole slides, synthetic cohorts.

Every source implements :class:`BagSource` (``bag_ids()``, ``iter_cells(bag_id)``, ``read_bag``,
``failures``) and is built by kind with :func:`create_source`. Every module of this package that
calls :func:`register_source` is a kind (adding one is one new file); plug-ins come from the
``milcore.sources`` entry points or ``$MILCORE_PLUGINS``. Importing this package is cheap: each kind's
module (and its heavy imports, e.g. OpenSlide) loads on first use.
"""

from feature_cache.sources.base import UNKNOWN_COORD, BagSource, Cell, CellBatch, SourceFailure
from feature_cache.sources.registry import (
    create_source,
    get_source_class,
    list_sources,
    register_source,
    source_options,
)

__all__ = [
    "UNKNOWN_COORD",
    "BagSource",
    "Cell",
    "CellBatch",
    "SourceFailure",
    "create_source",
    "get_source_class",
    "list_sources",
    "register_source",
    "source_options",
]
