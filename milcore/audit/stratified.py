"""The stratified audit of one set of labelled predictions: per-group metrics, gaps, tests, parity differences.

Each group is compared with the rest of the patients whose attribute is known (``gap = metric(group) -
metric(rest)``, tested by permutation), and described against the overall cohort and the best group of
its attribute (gaps and ratios with bootstrap CIs); a group without ``min_group_size`` other patients to
compare with (the only site) has status ``no_comparison``. Two families of tests are corrected separately, each
at ``alpha``: the *primary* family (``primary_metric`` on single-attribute groups, the pre-specified
question) and the *secondary* family (the other metrics, per-class recall and FPR, intersections and the
parity differences). A comparison is ``flagged`` when its corrected p-value is below ``alpha`` and the
group is worse than the rest. Groups below ``min_group_size`` are ``insufficient``: shown, never tested.
Groups without a patient (an empty intersection) are left out and listed in ``empty_groups``.

The audit also says when its answer cannot be read as reassurance (``warnings``, the rules of
:mod:`milcore.report.caveats`): when the overall model is not distinguishable from chance, subgroup
comparisons are not meaningful and the summary says so instead of "no subgroup is significantly worse";
when groups are too small to test, or none can be tested, the summary says that too.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from feature_cache.progress import progress
from milcore.audit.config import AuditConfig
from milcore.audit.groups import GroupSet, Subgroup
from milcore.audit.statistics import (
    adjust_pvalues,
    percentile_ci,
    permutation_masks,
    sequential_permutation_p,
    stratified_counts,
)
from milcore.metrics import GROUP_METRICS, higher_is_better, label
from milcore.metrics.weighted import LabelledPredictions, flatten, parity_differences, weighted_metrics
from milcore.report.caveats import chance_classes, headline_warnings, is_at_chance
from milcore.report.document import plural

log = logging.getLogger(__name__)


def _num(x: Any) -> float | None:
    """JSON-safe float (NaN -> None)."""
    x = float(x)
    return None if math.isnan(x) else x


def _ci(samples: np.ndarray, alpha: float) -> list[float | None]:
    return [_num(v) for v in percentile_ci(samples, alpha)]


def _ratio(a: float, b: float) -> float:
    return a / b if np.isfinite(a) and np.isfinite(b) and b != 0 else math.nan


def tested_metrics(config: AuditConfig, classes: list[str]) -> list[str]:
    """Names of the metrics whose gaps are tested (scalar metrics, then per-class recall and FPR)."""
    names = list(dict.fromkeys([config.primary_metric, *config.test_metrics]))
    if config.per_class:
        names += [f"recall[{c}]" for c in classes] + [f"fpr[{c}]" for c in classes]
    return names


def audit_predictions(pred: LabelledPredictions, classes: list[str], groups: GroupSet,
                      config: AuditConfig) -> dict[str, Any]:  # fmt: skip
    """Audit labelled predictions over the given subgroups.

    Args:
        pred: labelled predictions of n patients.
        classes: class names (columns of ``pred.proba``).
        groups: the subgroups (masks over the same n patients).
        config: the audit configuration.

    Returns:
        The JSON-ready audit (``overall``, ``groups``, ``empty_groups``, ``comparisons``, ``parity``,
        ``families``, ``summary``, ``warnings``), without the input/notes sections the caller adds.
    """
    rng = np.random.default_rng(config.seed)
    alpha = config.alpha
    names = tested_metrics(config, classes)
    need_auroc = "auroc" in names
    n = len(pred)
    everyone = np.ones((1, n))
    overall_point = flatten(weighted_metrics(pred, everyone, True), classes)
    boot_all = flatten(weighted_metrics(pred, stratified_counts(rng, np.zeros(n), config.n_boot), True), classes)
    overall = {"n": n, "metrics": {k: {"value": _num(v[0]), "ci95": _ci(boot_all[k], alpha)}
                                   for k, v in overall_point.items() if k != "n"}}  # fmt: skip
    group_rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    parity: list[dict[str, Any]] = []
    cache: dict[str, float] = {}
    attributes = list(dict.fromkeys(g.attribute for g in groups.groups))
    empty = [g.name for g in groups.groups if g.size == 0]  # e.g. an intersection nobody belongs to
    bar = progress(total=len(groups.groups) - len(empty), desc="audit groups", unit="group")
    for attribute in attributes:
        members = [g for g in groups.of(attribute) if g.size > 0]
        if not members:
            continue
        strata = np.full(n, "", dtype=object)
        for i, g in enumerate(members):
            strata[g.mask] = str(i)
        counts = stratified_counts(rng, strata, config.n_boot)  # (B, n) joint resample of this attribute
        boot_overall = flatten(weighted_metrics(pred, counts, need_auroc), classes)
        per_group: dict[str, dict[str, Any]] = {}
        for g in members:
            per_group[g.name] = _describe(pred, classes, g, counts, config, need_auroc)
            bar.update(1)
        sufficient = [g for g in members if per_group[g.name]["status"] == "ok"]
        best_of = _best_groups(sufficient, per_group, names)
        for g in members:
            info = per_group[g.name]
            row = info["row"]
            group_rows.append(row)
            if info["status"] != "ok":
                continue
            keys = {m: _test_key(g, members, m) for m in names}
            if all(k in cache for k in keys.values()):  # the other side of a two-group attribute: same test
                tested = {m: cache[keys[m]] for m in names}
            else:
                tested = _test_group(pred, classes, g, config, names, rng, need_auroc)
                cache.update({keys[m]: tested[m] for m in names})
            for m in names:
                value, rest = info["point"][m], info["rest_point"][m]
                bg = best_of.get(m)
                best_value = per_group[bg]["point"][m] if bg else math.nan
                best_boot = per_group[bg]["boot"][m] if bg else np.full(config.n_boot, np.nan)
                worse = (value < rest) if higher_is_better(m) else (value > rest)
                comparisons.append({
                    "group": g.name, "attribute": g.attribute, "level": g.level, "metric": m,
                    "family": "primary" if (m == config.primary_metric and g.level == "attribute") else "secondary",
                    "n_group": g.size, "n_rest": int(g.rest.sum()),
                    "value": _num(value), "rest": _num(rest),
                    "gap": _num(value - rest), "gap_ci95": _ci(info["boot"][m] - info["rest_boot"][m], alpha),
                    "ratio": _num(_ratio(value, rest)),
                    "gap_vs_overall": _num(value - overall_point[m][0]),
                    "gap_vs_overall_ci95": _ci(info["boot"][m] - boot_overall[m], alpha),
                    "ratio_vs_overall": _num(_ratio(value, overall_point[m][0])),
                    "best_group": bg, "gap_vs_best": _num(value - best_value),
                    "gap_vs_best_ci95": _ci(info["boot"][m] - best_boot, alpha) if bg != g.name else [0.0, 0.0],
                    "ratio_vs_best": _num(_ratio(value, best_value)),
                    "p_value": _num(tested[m]), "test_key": keys[m],
                    "worse": bool(np.isfinite(value) and np.isfinite(rest) and worse),
                })  # fmt: skip
        if len(sufficient) >= 2:
            parity += _parity(pred, sufficient, attribute, counts, config, rng)
    bar.close()
    families = _correct(comparisons, parity, config)
    support = np.bincount(pred.y_true, minlength=pred.num_classes)
    warnings = audit_warnings(overall, chance_classes(support, pred.num_classes), group_rows, config)
    return {"overall": overall, "groups": group_rows, "empty_groups": empty, "comparisons": comparisons,
            "parity": parity, "families": families,
            "summary": summarize(comparisons, parity, config, warnings=warnings), "warnings": warnings}  # fmt: skip


def audit_warnings(overall: dict[str, Any], num_classes: int, group_rows: list[dict[str, Any]],
                   config: AuditConfig) -> list[dict[str, Any]]:  # fmt: skip
    """What limits the audit: a chance-level model, groups too small to test, nothing testable.

    Args:
        overall: the overall metrics with CIs (``{"n", "metrics": {name: {"value", "ci95"}}}``).
        num_classes: classes present among the labels.
        group_rows: the non-empty groups with their ``status``.
        config: the audit configuration (minimum group size).
    """
    out = headline_warnings(overall["metrics"], num_classes, subject="The audited model")
    for w in out:
        if w["code"] in ("chance", "below_chance"):
            w["message"] += (" Subgroup comparisons of a chance-level model are not meaningful: equal (lack of) "
                             "performance across groups is not evidence of fairness.")  # fmt: skip
    small = [g for g in group_rows if g["status"] == "insufficient"]
    if small:
        names = ", ".join(f"{g['name']} (n = {g['n']})" for g in small[:8])
        names += f" and {len(small) - 8} more" if len(small) > 8 else ""
        out.append({"code": "small_groups", "severity": "caution", "message": f"{plural(len(small), 'group')} "
                    f"below the minimum of {config.min_group_size} patients {'is' if len(small) == 1 else 'are'} "
                    f"shown but not tested: {names}. A gap in such a group can be neither shown nor excluded.",
                    "groups": {g["name"]: int(g["n"]) for g in small}, "minimum": config.min_group_size})  # fmt: skip
    if not any(g["status"] == "ok" for g in group_rows):
        out.append({"code": "no_testable_group", "severity": "critical", "message": "No subgroup could be tested: "
                    f"every group has fewer than {config.min_group_size} patients or fewer than "
                    f"{config.min_group_size} others to compare with. This audit says nothing about bias.",
                    "minimum": config.min_group_size})  # fmt: skip
    return out


def _describe(pred: LabelledPredictions, classes: list[str], g: Subgroup, counts: np.ndarray, config: AuditConfig,
              need_auroc: bool) -> dict[str, Any]:  # fmt: skip
    """Point values and bootstrap samples of a group and of its rest."""
    alpha = config.alpha
    n_per_class = np.bincount(pred.y_true[g.mask], minlength=pred.num_classes)
    if g.size < config.min_group_size:
        status = "insufficient"
    elif g.rest.sum() < config.min_group_size:
        status = "no_comparison"  # (almost) everyone is in this group, e.g. the only site
    else:
        status = "ok"
    point = flatten(weighted_metrics(pred, g.mask[None].astype(float), True), classes)
    row: dict[str, Any] = {
        "name": g.name, "attribute": g.attribute, "level": g.level, "n": g.size,
        "n_per_class": {c: int(k) for c, k in zip(classes, n_per_class, strict=True)}, "status": status,
        "metrics": {k: {"value": _num(v[0])} for k, v in point.items() if k != "n"},
    }  # fmt: skip
    out: dict[str, Any] = {"status": status, "row": row, "point": {k: v[0] for k, v in point.items()}}
    if status != "ok":
        return out
    boot = flatten(weighted_metrics(pred, counts * g.mask, need_auroc), classes)
    rest_point = flatten(weighted_metrics(pred, g.rest[None].astype(float), need_auroc), classes)
    rest_boot = flatten(weighted_metrics(pred, counts * g.rest, need_auroc), classes)
    for k in row["metrics"]:
        if k in boot:
            row["metrics"][k]["ci95"] = _ci(boot[k], alpha)
    out.update(boot=boot, rest_point={k: v[0] for k, v in rest_point.items()}, rest_boot=rest_boot)
    return out


def _best_groups(sufficient: list[Subgroup], per_group: dict[str, dict[str, Any]], names: list[str]) -> dict[str, str]:
    """Per metric, the sufficient group with the best point value."""
    best: dict[str, str] = {}
    for m in names:
        higher = higher_is_better(m)
        scored = [(per_group[g.name]["point"][m], g.name) for g in sufficient
                  if np.isfinite(per_group[g.name]["point"][m])]  # fmt: skip
        if scored:
            best[m] = (max if higher else min)(scored)[1]
    return best


def _test_key(g: Subgroup, members: list[Subgroup], metric: str) -> str:
    """Identifies a test: the two groups of a binary attribute are one comparison seen from both sides."""
    others = [h for h in members if h.name != g.name and h.size > 0]
    if len(others) == 1 and np.array_equal(others[0].mask, g.rest):
        return f"{min(g.name, others[0].name)} vs {max(g.name, others[0].name)}: {metric}"
    return f"{g.name} vs rest: {metric}"


def _test_group(pred: LabelledPredictions, classes: list[str], g: Subgroup, config: AuditConfig, names: list[str],
                rng: np.random.Generator, need_auroc: bool) -> dict[str, float]:  # fmt: skip
    """Permutation p-values of every tested gap of one group (group membership shuffled within scope)."""
    point = flatten(weighted_metrics(pred, np.stack([g.mask, g.rest]).astype(float), need_auroc), classes)
    observed = {m: float(point[m][0] - point[m][1]) for m in names}

    def null(k: int, active: list[str]) -> dict[str, np.ndarray]:
        masks = permutation_masks(rng, g.mask, g.scope, k)
        rest = g.scope[None] & ~masks
        W = np.concatenate([masks, rest]).astype(float)
        both = flatten(weighted_metrics(pred, W, need_auroc and "auroc" in active), classes)
        return {m: both[m][:k] - both[m][k:] for m in active}

    return sequential_permutation_p(observed, null, config.n_perm)


def _parity(pred: LabelledPredictions, members: list[Subgroup], attribute: str, counts: np.ndarray, config: AuditConfig,
            rng: np.random.Generator) -> list[dict[str, Any]]:  # fmt: skip
    """Equalized-odds and demographic-parity differences of one attribute with CIs and permutation p-values."""
    masks = np.stack([g.mask for g in members]).astype(float)  # (G, n)
    scope = members[0].scope
    point = weighted_metrics(pred, masks, with_auroc=False)
    observed = {k: float(v) for k, v in parity_differences(point).items()}
    G, B = len(members), len(counts)
    boot = weighted_metrics(pred, (counts[:, None, :] * masks[None]).reshape(B * G, -1), with_auroc=False)
    boot_diff = parity_differences({k: boot[k].reshape(B, G, -1) for k in ("recall", "fpr", "selection_rate")})
    labels = np.argmax(masks, axis=0)
    pool = np.flatnonzero(scope)

    def null(k: int, active: list[str]) -> dict[str, np.ndarray]:
        perm = np.stack([rng.permutation(labels[pool]) for _ in range(k)])  # (k, |scope|)
        W = np.zeros((k, G, pred.y_true.shape[0]))
        for j in range(G):
            W[:, j, pool] = perm == j
        m = weighted_metrics(pred, W.reshape(k * G, -1), with_auroc=False)
        return parity_differences({key: m[key].reshape(k, G, -1) for key in ("recall", "fpr", "selection_rate")})

    pvals = sequential_permutation_p(observed, null, config.n_perm, two_sided=False)
    return [{"attribute": attribute, "groups": [g.name for g in members], "metric": k, "value": _num(observed[k]),
             "ci95": _ci(boot_diff[k], config.alpha), "p_value": _num(pvals[k]), "family": "secondary",
             "test_key": f"{attribute}: {k}"} for k in observed]  # fmt: skip


def _correct(comparisons: list[dict[str, Any]], parity: list[dict[str, Any]], config: AuditConfig) -> dict[str, Any]:
    """Adjust p-values within each family (one test per ``test_key``) and set ``p_corrected`` and ``flagged``."""
    families: dict[str, Any] = {}
    rows = comparisons + parity
    for family in ("primary", "secondary"):
        keys: dict[str, float] = {}
        for r in rows:
            if r["family"] == family and r["p_value"] is not None:
                keys.setdefault(r["test_key"], r["p_value"])
        adjusted = dict(zip(keys, adjust_pvalues(list(keys.values()), config.correction), strict=True))
        for r in rows:
            if r["family"] == family:
                p = adjusted.get(r["test_key"], math.nan)
                r["p_corrected"] = _num(p)
                significant = bool(np.isfinite(p) and p < config.alpha)
                r["flagged"] = significant and r.get("worse", True)
        families[family] = {"tests": len(keys), "correction": config.correction, "alpha": config.alpha,
                            "flagged": sum(1 for r in rows if r["family"] == family and r["flagged"])}  # fmt: skip
    return families


def summarize(comparisons: list[dict[str, Any]], parity: list[dict[str, Any]], config: AuditConfig,
              warnings: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Plain-language summary naming the groups where the model is significantly worse.

    With ``warnings`` saying the model is at chance or that nothing could be tested, the headline says
    that first, instead of the reassuring-sounding "no subgroup is significantly worse".
    """
    warnings = warnings or []
    flagged = [c for c in comparisons if c["flagged"]]
    primary = [c for c in flagged if c["family"] == "primary"]
    lines = []
    for c in sorted(primary, key=lambda c: c["p_corrected"]):
        lines.append(
            f"{c['group']}: {c['metric'].replace('_', ' ')} {c['value']:.3f} vs {c['rest']:.3f} in the other "
            f"patients (gap {c['gap']:+.3f}, corrected p = {c['p_corrected']:.3g}, n = {c['n_group']})."
        )
    secondary_groups = sorted({c["group"] for c in flagged if c["family"] == "secondary"})
    for g in secondary_groups:
        ms = [c for c in flagged if c["group"] == g and c["family"] == "secondary"]
        worst = min(ms, key=lambda c: c["p_corrected"])
        lines.append(
            f"{g}: worse on {', '.join(sorted({c['metric'] for c in ms}))} (e.g. {worst['metric']} "
            f"{worst['value']:.3f} vs {worst['rest']:.3f}, corrected p = {worst['p_corrected']:.3g})."
        )
    for p in parity:
        if p["flagged"]:
            lines.append(f"{p['attribute']}: {p['metric'].replace('_', ' ')} {p['value']:.3f} is significant "
                         f"(corrected p = {p['p_corrected']:.3g}).")  # fmt: skip
    groups = sorted({c["group"] for c in flagged})
    codes = {w["code"] for w in warnings}
    if is_at_chance(warnings):
        head = (f"The audited model is not distinguishable from chance on this cohort ({_chance_numbers(warnings)}): "
                "subgroup comparisons of a chance-level model are not meaningful, and finding no subgroup worse "
                "than the others is not evidence of fairness."
                + (f" Groups flagged anyway: {', '.join(groups)}." if groups else ""))  # fmt: skip
    elif "no_testable_group" in codes:
        head = (f"No subgroup could be tested (every group has fewer than {config.min_group_size} patients, or "
                "too few others to compare with): this audit cannot say whether the model is worse for anyone.")
    elif groups:
        head = f"The model is significantly worse (corrected p < {config.alpha}) for: {', '.join(groups)}."
    else:
        head = (
            f"No subgroup is significantly worse than the other patients after {config.correction} correction "
            f"(alpha {config.alpha}); small gaps in small groups cannot be excluded, see the CIs."
        )
    return {"flagged_groups": groups, "primary_flagged": sorted({c["group"] for c in primary}), "headline": head,
            "details": lines, "metrics_higher_is_better": {m: higher_is_better(m) for m in GROUP_METRICS},
            "at_chance": is_at_chance(warnings)}  # fmt: skip


def _chance_numbers(warnings: list[dict[str, Any]]) -> str:
    """``balanced accuracy 0.21 [0.12, 0.33], chance 0.20; ...`` from the chance warnings' details."""
    parts = []
    for w in warnings:
        if w["code"] in ("chance", "below_chance"):
            for name, v in w["metrics"].items():
                ci = v["ci95"]
                shown = f"{v['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                parts.append(f"{label(name)} {shown}, chance {v['chance']:.3f}")
    return "; ".join(parts)
