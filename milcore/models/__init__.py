"""MIL aggregators behind one contract (see :mod:`milcore.models.base`) and their registry.

Importing this package registers every aggregator (one module each, decorated with
:func:`register_aggregator`); importing ``milcore`` alone does not. Build one with
``create_aggregator(name, in_dim=..., num_classes=..., **overrides)``; list them with
``list_aggregators("*")``.
"""

from milcore.models import abmil, amil, dsmil, graphmil, maxpool, meanpool, transmil
from milcore.models.base import AggregatorConfig, EpochContext, MILAggregator
from milcore.models.output import MILOutput
from milcore.models.registry import create_aggregator, get_aggregator_entry, list_aggregators, register_aggregator

__all__ = [
    "AggregatorConfig",
    "EpochContext",
    "MILAggregator",
    "MILOutput",
    "abmil",
    "amil",
    "create_aggregator",
    "dsmil",
    "get_aggregator_entry",
    "graphmil",
    "list_aggregators",
    "maxpool",
    "meanpool",
    "register_aggregator",
    "transmil",
]
