"""``ShortcutConfig``: how ``milcore audit shortcuts`` fits and flags its checks (kept apart from
:mod:`milcore.trust.shortcuts` so that building the CLI parser imports no numpy)."""

from __future__ import annotations

from dataclasses import dataclass

from feature_cache.config import Config, option

__all__ = ["ShortcutConfig"]


@dataclass(frozen=True)
class ShortcutConfig(Config):
    """How shortcut checks are fitted and flagged.

    Attributes:
        alpha: a check is significant when its permutation p-value is below this.
        min_share: ...and flagged when it reaches this share of the aggregator's gain over chance.
        permutations: label permutations of each check's significance test.
        max_crops: crops sampled per patient for image size and colour statistics.
        bins: quantile bins of each numeric signal (beside its standardised value).
        c: inverse L2 strength of the logistic regressions.
        seed: crop sampling and permutation seed.
        ignore: cohort columns left out of the checks (e.g. a synthetic cohort's ground-truth columns).
    """

    config_key = "shortcut option"

    alpha: float = option(0.05, low=0, high=1, low_open=True)
    min_share: float = option(0.6, low=0, high=1)
    permutations: int = option(2000, low=50)
    max_crops: int = option(24, low=1)
    bins: int = option(4, low=2, high=20)
    c: float = option(1.0, low=0, low_open=True)
    seed: int = option(0, low=0)
    ignore: tuple[str, ...] = option(())
