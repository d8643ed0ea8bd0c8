"""Rehearsal-based continual MIL: task streams, exemplar memory, strategies, stream metrics.

Importing this package is cheap; the strategies register on first use of
:func:`~milcore.continual.strategies.create_strategy` / :func:`~milcore.continual.strategies.list_strategies`.
"""
