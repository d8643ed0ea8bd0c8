"""Continual-learning strategies behind one protocol (see :mod:`.base`); importing registers them."""

from milcore.continual.strategies.base import (
    Strategy,
    StrategyContext,
    create_strategy,
    list_strategies,
    register_strategy,
)
from milcore.continual.strategies.finetune import Finetune, Joint
from milcore.continual.strategies.icarl import ICaRL
from milcore.continual.strategies.regularization import EWC, LwF
from milcore.continual.strategies.replay import ConfidenceUncertainty, MILReplay, RandomReplay

__all__ = [
    "EWC",
    "ConfidenceUncertainty",
    "Finetune",
    "ICaRL",
    "Joint",
    "LwF",
    "MILReplay",
    "RandomReplay",
    "Strategy",
    "StrategyContext",
    "create_strategy",
    "list_strategies",
    "register_strategy",
]
