"""Bias audits: per-subgroup metrics with bootstrap CIs and permutation tests, imbalance experiments, reports.

Modules: :mod:`~milcore.audit.config` (what to audit), :mod:`~milcore.audit.groups` (subgroups from a cohort
table), :mod:`~milcore.metrics.weighted` (weighted metric engine), :mod:`~milcore.audit.statistics`
(bootstrap, permutation, multiple-comparison correction, trend tests), :mod:`~milcore.audit.stratified`
(the audit of one run), :mod:`~milcore.audit.imbalance` (the imbalance experiment: re-training under
controlled imbalance) and :mod:`~milcore.audit.report` (``audit.json``/``.md``/``.html``).
"""
