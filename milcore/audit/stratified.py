"""The stratified audit of one set of labelled predictions: per-group metrics, gaps, tests, parity differences.

Each group is compared with the rest of the patients whose attribute is known (``gap = metric(group) -
metric(rest)``, tested by permutation within classes, see :mod:`milcore.audit.statistics`), and described
against the overall cohort and the best group of its attribute (gaps and ratios with bootstrap CIs); a group
without ``min_group_size`` other patients to compare with (the only site) has status ``no_comparison``. When a
class is missing from the group or from the rest, the group's comparisons use the classes both sides have
(``classes_compared``) and the tests that cannot be run are listed with their reason (``skipped_tests`` of the
group). Two families of tests are corrected separately, each at ``alpha``: the *primary* family
(each of the ``primary_metrics`` on single-attribute groups of the ``primary_attributes``, the pre-specified
question) and
the *secondary* family (the other metrics, per-class recall and FPR, intersections, the other attributes and
the parity differences). With ``correction="westfall-young"`` the primary family is tested again on joint
permutations (every patient's attributes moved together to another patient of the same class, so every group of
the family is shuffled by the same draw) and corrected by Westfall-Young step-down min-P; the secondary family
gets Holm. ``primary_weights="attributes"`` shares the primary family's alpha equally among the attributes
first (weighted Holm / Westfall-Young). A comparison is ``flagged`` when its corrected p-value is below
``alpha`` and the group is worse than the rest; every comparison carries its minimum detectable effect
(``mde``: the gap its test would find with ``mde_power`` at the p-value its procedure asks of it when it is the
family's one real effect), which the summary prints beside every primary verdict that is not a flag. Groups
below ``min_group_size`` are ``insufficient``: shown, never tested, no MDE.
Groups without a patient (an empty intersection) are left out and listed in ``empty_groups``.

The audit also says when its answer cannot be read as reassurance (``warnings``, the rules of
:mod:`milcore.report.caveats`): when the overall model is not distinguishable from chance, subgroup
comparisons are not meaningful and the summary says so instead of "no subgroup is significantly worse";
when groups are too small to test, or none can be tested, the summary says that too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from feature_cache.progress import progress
from milcore.audit.config import AuditConfig
from milcore.audit.groups import GroupSet, Subgroup
from milcore.audit.statistics import (
    PermutationTest,
    adjust_pvalues,
    class_permutations,
    minimum_detectable_effect,
    permutation_masks,
    permutation_pvalues,
    sequential_permutation_test,
    stratified_permutation_masks,
    westfall_young,
    westfall_young_threshold,
)
from milcore.metrics import GROUP_METRICS, get_metric, higher_is_better, label
from milcore.metrics.intervals import percentile_ci, stratified_counts
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
    names = list(dict.fromkeys([*config.primary_metrics, *config.test_metrics]))
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
    cache: dict[str, tuple[PermutationTest, PermutationTest]] = {}
    compares: dict[str, Compared] = {}
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
            compares[g.name] = info["compare"]
            other = _other_side(g, members)
            keys = {m: _test_key(g, other, m, config.alternative) for m in names}
            pair = {m: _test_key(g, other, m, "two-sided") for m in names}  # one set of permutations per pair
            if all(k in cache for k in pair.values()):  # the other side of a two-group attribute
                tested = {m: cache[pair[m]][1 if other is not None and config.alternative == "worse" else 0]
                          for m in names}  # fmt: skip
            else:
                both = _test_group(pred, classes, info["compare"], config, names, rng, need_auroc,
                                   two_sides=other is not None)  # fmt: skip
                cache.update({pair[m]: both[m] for m in names})
                tested = {m: both[m][0] for m in names}
            skipped = {s["metric"]: s["reason"] for s in row.get("skipped_tests", [])}
            for m in names:
                value, rest = info["point"][m], info["rest_point"][m]
                bg = best_of.get(m)
                best_value = per_group[bg]["point"][m] if bg else math.nan
                best_boot = per_group[bg]["boot"][m] if bg else np.full(config.n_boot, np.nan)
                worse = (value < rest) if higher_is_better(m) else (value > rest)
                test = tested[m]
                entry = {
                    "group": g.name, "attribute": g.attribute, "level": g.level, "metric": m,
                    "family": "primary" if _primary(g, m, config) else "secondary",
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
                    "p_value": _num(test.p), "alternative": config.alternative, "test_key": keys[m],
                    "permutations": test.permutations, "null_sd": _num(test.null_sd),
                    "worse": bool(np.isfinite(value) and np.isfinite(rest) and worse),
                }  # fmt: skip
                if info["classes_compared"] is not None:
                    entry["classes_compared"] = info["classes_compared"]
                if not np.isfinite(test.p):
                    entry["skipped"] = skipped.get(m) or _why_untestable(m, value, rest)
                comparisons.append(entry)
        if len(sufficient) >= 2:
            parity += _parity(pred, sufficient, attribute, counts, config, rng)
    bar.close()
    joint = _joint_primary(pred, classes, comparisons, compares, config, rng)
    families = _correct(comparisons, parity, config, joint)
    _translate_mde(pred, comparisons, compares, config)
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
    compare = compared_patients(pred, classes, g, config)
    if compare.notes:
        row["notes"] = compare.notes
    if compare.skipped:
        row["skipped_tests"] = compare.skipped
    boot = flatten(weighted_metrics(pred, counts * g.mask, need_auroc), classes)
    for k in row["metrics"]:
        if k in boot:
            row["metrics"][k]["ci95"] = _ci(boot[k], alpha)
    if compare.classes is not None:  # a class missing on one side: both sides compared on the shared classes
        point = flatten(weighted_metrics(pred, compare.group[None].astype(float), need_auroc), classes)
        boot = flatten(weighted_metrics(pred, counts * compare.group, need_auroc), classes)
    rest_point = flatten(weighted_metrics(pred, compare.rest[None].astype(float), need_auroc), classes)
    rest_boot = flatten(weighted_metrics(pred, counts * compare.rest, need_auroc), classes)
    out.update(point={k: v[0] for k, v in point.items()}, boot=boot, rest_boot=rest_boot, compare=compare,
               rest_point={k: v[0] for k, v in rest_point.items()}, classes_compared=compare.classes)  # fmt: skip
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


@dataclass
class Compared:
    """The patients a group is compared on, and what could not be compared.

    Attributes:
        group: (n,) bool, the group's patients compared.
        rest: (n,) bool, the other patients compared.
        scope: (n,) bool, ``group | rest`` (what permutations draw from).
        classes: the classes compared when a class is missing on one side (``None``: all of them).
        skipped: ``{"metric", "reason"}`` of every test that cannot be run.
        notes: one sentence per class missing on one side.
    """

    group: np.ndarray
    rest: np.ndarray
    scope: np.ndarray
    classes: list[str] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compared_patients(pred: LabelledPredictions, classes: list[str], g: Subgroup, config: AuditConfig) -> Compared:
    """A group and its rest restricted to the classes both have, with the tests a missing class rules out.

    A class present in the cohort but absent from the group (or from the rest) has no recall there, so its
    recall test is skipped; the class-balanced metrics (balanced accuracy, log-loss, Brier score) and the
    others would compare different sets of classes, so both sides are compared on the shared classes.
    """
    in_group = np.bincount(pred.y_true[g.mask], minlength=pred.num_classes) > 0
    in_rest = np.bincount(pred.y_true[g.rest], minlength=pred.num_classes) > 0
    one_sided = in_group ^ in_rest
    if not one_sided.any():
        return Compared(g.mask, g.rest, g.scope)
    shared = in_group & in_rest
    keep = shared[pred.y_true]
    out = Compared(g.mask & keep, g.rest & keep, g.scope & keep, [c for c, s in zip(classes, shared, strict=True) if s])
    for k in np.flatnonzero(one_sided):
        where = "the group" if in_rest[k] else "the other patients"
        c = classes[k]
        if config.per_class:
            out.skipped.append({"metric": f"recall[{c}]", "reason": f"no patient of class {c} in {where}"})
        out.notes.append(f"class {c} is absent from {where}, so the comparisons use the {len(out.classes)} classes "
                         f"both sides have ({', '.join(out.classes)})")  # fmt: skip
    if not shared.any():
        out.notes.append("no class in common with the other patients: nothing can be compared")
    return out


def _why_untestable(metric: str, value: float, rest: float) -> str:
    """Why a gap has no test (a metric undefined on one side)."""
    side = "the group" if not np.isfinite(value) else "the other patients"
    if metric == "auroc":
        return f"AUROC needs patients of two classes in {side}"
    if metric.startswith("recall["):
        return f"no patient of class {metric[7:-1]} in {side}"
    if metric.startswith("fpr["):
        return f"no patient outside class {metric[4:-1]} in {side}"
    return f"{label(metric)} is undefined for {side}"


def _primary(g: Subgroup, metric: str, config: AuditConfig) -> bool:
    """Whether a comparison belongs to the primary family: the primary metric on a single-attribute group of a
    primary attribute (every audited attribute when none is named)."""
    return (metric in config.primary_metrics and g.level == "attribute"
            and (not config.primary_attributes or g.attribute in config.primary_attributes))  # fmt: skip


def _other_side(g: Subgroup, members: list[Subgroup]) -> Subgroup | None:
    """The other group of a two-valued attribute (its complement within the scope), else ``None``."""
    others = [h for h in members if h.name != g.name and h.size > 0]
    if len(others) == 1 and np.array_equal(others[0].mask, g.rest):
        return others[0]
    return None


def _test_key(g: Subgroup, other: Subgroup | None, metric: str, alternative: str) -> str:
    """Identifies a test of a family. Two-sided, the two groups of a two-valued attribute are one comparison
    seen from both sides; one-sided, "F worse" and "M worse" are two tests."""
    if alternative == "worse":
        return f"{g.name} worse than {other.name if other is not None else 'rest'}: {metric}"
    if other is not None:
        return f"{min(g.name, other.name)} vs {max(g.name, other.name)}: {metric}"
    return f"{g.name} vs rest: {metric}"


def _test_group(pred: LabelledPredictions, classes: list[str], compare: Compared, config: AuditConfig,
                names: list[str], rng: np.random.Generator, need_auroc: bool,
                two_sides: bool) -> dict[str, tuple[PermutationTest, PermutationTest]]:  # fmt: skip
    """Permutation tests of every tested gap of one group (group membership shuffled within classes).

    Returns:
        metric -> (test of this group, test of the other group of a two-valued attribute): one-sided tests of
        "worse than the rest" in the worse direction (the statistic is the gap signed so that larger is worse),
        or one two-sided test twice.
    """
    point = flatten(weighted_metrics(pred, np.stack([compare.group, compare.rest]).astype(float), need_auroc),
                    classes)  # fmt: skip
    worse = {m: 1.0 if not higher_is_better(m) else -1.0 for m in names}  # sign * gap > 0: the group is worse
    one_sided = config.alternative == "worse"
    observed = {}
    for m in names:
        gap = float(point[m][0] - point[m][1])
        observed[m] = worse[m] * gap if one_sided else gap
        if one_sided and two_sides:
            observed[f"{m}|other"] = -worse[m] * gap

    def null(k: int, active: list[str]) -> dict[str, np.ndarray]:
        if config.permute_within_class:
            masks = stratified_permutation_masks(rng, compare.group, compare.scope, pred.y_true, k)
        else:
            masks = permutation_masks(rng, compare.group, compare.scope, k)
        rest = compare.scope[None] & ~masks
        W = np.concatenate([masks, rest]).astype(float)
        metric_of = {a: a.split("|")[0] for a in active}
        both = flatten(weighted_metrics(pred, W, need_auroc and "auroc" in metric_of.values()), classes)
        out = {}
        for a, m in metric_of.items():
            gap = both[m][:k] - both[m][k:]
            out[a] = gap if not one_sided else (-worse[m] * gap if a.endswith("|other") else worse[m] * gap)
        return out

    tests = sequential_permutation_test(observed, null, config.n_perm, two_sided=not one_sided)
    out = {}
    for m in names:
        mine = tests[m]
        theirs = tests.get(f"{m}|other", mine)
        spread = max((mine, theirs), key=lambda t: t.permutations)  # the same null, drawn longer by one of them
        out[m] = (PermutationTest(mine.p, spread.null_sd, spread.null_mean, mine.permutations),
                  PermutationTest(theirs.p, spread.null_sd, spread.null_mean, theirs.permutations))  # fmt: skip
    return out


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

    tests = sequential_permutation_test(observed, null, config.n_perm, two_sided=False)
    return [{"attribute": attribute, "groups": [g.name for g in members], "metric": k, "value": _num(observed[k]),
             "ci95": _ci(boot_diff[k], config.alpha), "p_value": _num(tests[k].p), "family": "secondary",
             "test_key": f"{attribute}: {k}", "permutations": tests[k].permutations,
             "null_sd": _num(tests[k].null_sd), "null_mean": _num(tests[k].null_mean)} for k in observed]  # fmt: skip


@dataclass
class JointFamily:
    """The primary family tested on joint permutations (``correction="westfall-young"``).

    Attributes:
        adjusted: test key -> Westfall-Young step-down min-P adjusted p-value.
        raw: test key -> the test's own p-value on the same permutations.
        null_sd: test key -> spread of its statistic over the permutations.
        threshold: test key -> the raw p-value it must pass at the first step (for the MDE).
        permutations: joint permutations drawn.
    """

    adjusted: dict[str, float]
    raw: dict[str, float]
    null_sd: dict[str, float]
    threshold: dict[str, float]
    permutations: int


def family_weights(rows: dict[str, dict[str, Any]], family: str, config: AuditConfig) -> np.ndarray | None:
    """Weights of a family's tests (one row per test key): ``None`` (equal) unless the primary family shares its
    alpha by attribute (``primary_weights="attributes"``): 1 / (attributes x that attribute's tests)."""
    if family != "primary" or config.primary_weights == "tests" or not rows:
        return None
    per_attribute: dict[str, int] = {}
    for r in rows.values():
        per_attribute[r["attribute"]] = per_attribute.get(r["attribute"], 0) + 1
    return np.asarray([1.0 / (len(per_attribute) * per_attribute[r["attribute"]]) for r in rows.values()])


def family_correction(config: AuditConfig, family: str) -> str:
    """The correction a family gets: Westfall-Young needs joint permutations, which the primary family has (one
    metric on the single-attribute groups); the secondary family (many metrics, intersections, parity) gets Holm."""
    if config.correction == "westfall-young" and family != "primary":
        return "holm"
    return config.correction


def _joint_primary(pred: LabelledPredictions, classes: list[str], comparisons: list[dict[str, Any]],
                   compares: dict[str, Compared], config: AuditConfig,
                   rng: np.random.Generator) -> JointFamily | None:  # fmt: skip
    """Test every primary comparison on the same permutations (patients shuffled within their true class, all
    attributes together) and adjust them by Westfall-Young step-down min-P; ``None`` for the other corrections."""
    if config.correction != "westfall-young":
        return None
    rows: dict[str, dict[str, Any]] = {}
    for r in comparisons:
        if r["family"] == "primary" and r["p_value"] is not None:
            rows.setdefault(r["test_key"], r)
    if not rows:
        return None
    one_sided = config.alternative == "worse"
    tests = list(rows.values())
    sign = np.asarray([-1.0 if higher_is_better(r["metric"]) else 1.0 for r in tests])  # sign * gap > 0: worse
    observed = [s * r["gap"] if one_sided else r["gap"] for s, r in zip(sign, tests, strict=True)]
    by_group: dict[str, list[int]] = {}  # a group's tests (one per primary metric) share its weighted counts
    for j, r in enumerate(tests):
        by_group.setdefault(r["group"], []).append(j)
    null = np.zeros((config.n_perm, len(tests)))  # (B, m)
    for start in range(0, config.n_perm, 250):  # batches keep the (2k, n) weights small on large cohorts
        perms = class_permutations(rng, pred.y_true, min(250, config.n_perm - start))  # (k, n)
        k = len(perms)
        for group, columns in by_group.items():
            c = compares[group]
            W = np.concatenate([c.group[perms], c.rest[perms]]).astype(float)  # (2k, n)
            auroc = any(tests[j]["metric"] == "auroc" for j in columns)
            values = flatten(weighted_metrics(pred, W, auroc), classes)
            for j in columns:
                gap = values[tests[j]["metric"]][:k] - values[tests[j]["metric"]][k:]  # (k,)
                null[start : start + k, j] = sign[j] * gap if one_sided else gap
    obs, nulls = np.asarray(observed, dtype=float), null
    weights = family_weights(rows, "primary", config)
    adjusted = westfall_young(obs, nulls, two_sided=not one_sided, weights=weights)
    raw = permutation_pvalues(obs, nulls, two_sided=not one_sided)
    sd = np.nanstd(nulls, axis=0, ddof=1)
    keys = list(rows)
    return JointFamily(dict(zip(keys, adjusted.tolist(), strict=True)), dict(zip(keys, raw.tolist(), strict=True)),
                       dict(zip(keys, sd.tolist(), strict=True)),
                       dict(zip(keys, westfall_young_threshold(nulls, config.alpha, not one_sided, weights).tolist(),
                                strict=True)), config.n_perm)  # fmt: skip


def _correct(comparisons: list[dict[str, Any]], parity: list[dict[str, Any]], config: AuditConfig,
             joint: JointFamily | None = None) -> dict[str, Any]:  # fmt: skip
    """Adjust p-values within each family (one test per ``test_key``); set ``p_corrected``, ``flagged`` and ``mde``.

    With ``joint`` (Westfall-Young), the primary rows take its p-values, null spreads and adjusted p-values.
    """
    families: dict[str, Any] = {}
    rows = comparisons + parity
    for family in ("primary", "secondary"):
        correction = family_correction(config, family)
        use_joint = joint is not None and family == "primary"
        first: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["family"] == family and r["p_value"] is not None:
                if use_joint:
                    r.update(p_value=_num(joint.raw[r["test_key"]]), null_sd=_num(joint.null_sd[r["test_key"]]),
                             permutations=joint.permutations, joint_permutations=True)  # fmt: skip
                first.setdefault(r["test_key"], r)
        keys = {k: r["p_value"] for k, r in first.items()}
        weights = family_weights(first, family, config)
        share = dict(zip(keys, (weights / weights.sum()).tolist(), strict=True)) if weights is not None else {}
        if use_joint:
            adjusted = {k: joint.adjusted[k] for k in keys}
        else:
            adjusted = dict(zip(keys, adjust_pvalues(list(keys.values()), correction, weights), strict=True))
        for r in rows:
            if r["family"] == family:
                p = adjusted.get(r["test_key"], math.nan)
                r["p_corrected"] = _num(p)
                significant = bool(np.isfinite(p) and p < config.alpha)
                r["flagged"] = significant and r.get("worse", True)
                if r["p_value"] is not None:
                    threshold = (joint.threshold[r["test_key"]] if use_joint else
                                 config.alpha * share[r["test_key"]] if share else None)  # fmt: skip
                    _set_mde(r, len(keys), config, threshold)
        families[family] = {"tests": len(keys), "correction": correction, "alpha": config.alpha,
                            "alternative": config.alternative, "permute_within_class": config.permute_within_class,
                            "mde_power": config.mde_power, "weights": config.primary_weights
                            if family == "primary" else "tests",
                            "alpha_per_test": config.alpha / max(len(keys), 1),
                            "flagged": sum(1 for r in rows if r["family"] == family and r["flagged"])}  # fmt: skip
        families[family]["first_step_p"] = {  # the raw p-value each test must pass when it is the one real effect
            k: _num(joint.threshold[k] if use_joint else config.alpha * share[k] if share else
                    config.alpha / len(keys)) for k in keys}  # fmt: skip
        if use_joint:
            families[family]["joint_permutations"] = joint.permutations
    return families


#: Group metrics that are class-balanced means of a per-patient score of the true class's probability.
SCORE_METRICS = ("balanced_brier", "balanced_log_loss", "balanced_log_odds")


def _translate_mde(pred: LabelledPredictions, comparisons: list[dict[str, Any]], compares: dict[str, Compared],
                   config: AuditConfig) -> None:  # fmt: skip
    """Primary rows on a per-patient score get ``mde_balanced_accuracy``: the balanced accuracy the group would
    lose if its score worsened by the MDE through lost confidence in the true class (:mod:`.detectable`)."""
    from milcore.audit.detectable import equivalent_gap

    for r in comparisons:
        if r["family"] == "primary" and r.get("mde") is not None and r["metric"] in SCORE_METRICS:
            mask = compares[r["group"]].group
            r["mde_balanced_accuracy"] = _num(equivalent_gap(pred.y_true[mask], pred.proba[mask], r["metric"],
                                                             r["mde"]))  # fmt: skip


def _set_mde(row: dict[str, Any], tests: int, config: AuditConfig, threshold: float | None = None) -> None:
    """The row's minimum detectable effect: the gap (or parity difference) its test finds with ``mde_power`` when
    it is the family's one real effect (p below alpha / tests, or below the Westfall-Young first-step
    ``threshold``), from the spread of its own permutation null."""
    parity = "null_mean" in row
    two_sided = config.alternative == "two-sided" and not parity
    sd = math.nan if row.get("null_sd") is None else row["null_sd"]
    mde = minimum_detectable_effect(sd, config.alpha, tests, config.mde_power, two_sided,
                                    null_mean=(row["null_mean"] or 0.0) if parity else 0.0,
                                    p_threshold=threshold)  # fmt: skip
    if parity:
        room = 1.0
    else:
        metric = get_metric(row["metric"])
        rest = math.nan if row["rest"] is None else row["rest"]
        room = abs(rest - metric.worst) if np.isfinite(metric.worst) else math.inf
    row["mde"] = _num(mde) if np.isfinite(mde) and mde <= room else None
    if np.isfinite(mde) and mde > room:
        row["mde_note"] = (f"no {'difference' if parity else 'gap'} within the metric's range is found with "
                           f"{config.mde_power:.0%} power at this size")  # fmt: skip
    elif not np.isfinite(mde):
        row["mde_note"] = "no permutation spread to size an effect from"


def correction_name(config: AuditConfig) -> str:
    """``holm``, or ``Westfall-Young (primary family; Holm in the secondary)``, for the headline."""
    if config.correction == "westfall-young":
        return "Westfall-Young (primary family; Holm in the secondary)"
    return config.correction


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
        ba = next((b for b in comparisons if b["group"] == c["group"] and b["metric"] == "balanced_accuracy"
                   and c["metric"] != "balanced_accuracy" and b["value"] is not None), None)  # fmt: skip
        lines.append(
            f"{c['group']}: {label(c['metric'])} {c['value']:.3f} vs {c['rest']:.3f} in the other "
            f"patients (gap {c['gap']:+.3f}, corrected p = {c['p_corrected']:.3g}, n = {c['n_group']})"
            + (f"; balanced accuracy {ba['value']:.3f} vs {_fmt(ba['rest'])}." if ba else ".")
        )
    secondary_groups = sorted({c["group"] for c in flagged if c["family"] == "secondary"})
    for g in secondary_groups:
        ms = [c for c in flagged if c["group"] == g and c["family"] == "secondary"]
        worst = min(ms, key=lambda c: c["p_corrected"])
        lines.append(
            f"{g}: worse on {', '.join(sorted({c['metric'] for c in ms}))} (e.g. {label(worst['metric'])} "
            f"{worst['value']:.3f} vs {worst['rest']:.3f}, corrected p = {worst['p_corrected']:.3g})."
        )
    for p in parity:
        if p["flagged"]:
            lines.append(f"{p['attribute']}: {label(p['metric'])} {p['value']:.3f} is significant "
                         f"(corrected p = {p['p_corrected']:.3g}).")  # fmt: skip
    groups = sorted({c["group"] for c in flagged})
    quiet = [c for c in comparisons if c["family"] == "primary" and not c["flagged"] and c["p_value"] is not None]
    not_flagged = [{"group": c["group"], "metric": c["metric"], "mde": c.get("mde"),
                    "text": not_flagged_line(c, config)} for c in quiet]  # fmt: skip
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
            f"No subgroup is significantly worse than the other patients after {correction_name(config)} correction "
            f"(alpha {config.alpha}). This is not evidence of fairness: " + _mde_range(quiet, config)
        )
    return {"flagged_groups": groups, "primary_flagged": sorted({c["group"] for c in primary}), "headline": head,
            "details": lines, "not_flagged": not_flagged,
            "metrics_higher_is_better": {m: higher_is_better(m) for m in GROUP_METRICS},
            "at_chance": is_at_chance(warnings)}  # fmt: skip


#: Metrics whose gaps read as percentage points (rates); the others (scores, calibration) are shown as they are.
_POINTS = ("balanced_accuracy", "accuracy", "macro_f1", "auroc", "recall", "fpr", "selection_rate")


def format_gap(metric: str, value: float | None) -> str:
    """``14.2 points`` for a rate (balanced accuracy, recall, ...), ``0.034`` for a score (Brier, log-loss, ECE)."""
    if value is None or not np.isfinite(value):
        return "–"
    return f"{100 * value:.1f} points" if metric.split("[")[0] in _POINTS else f"{value:.3f}"


def not_flagged_line(c: dict[str, Any], config: AuditConfig) -> str:
    """The verdict of a comparison that was not flagged, with the gap its test could have missed."""
    head = (f"{c['group']}: not flagged ({label(c['metric'])} {_fmt(c['value'])} vs {_fmt(c['rest'])} in the other "
            f"patients, corrected p = {_fmt(c['p_corrected'], '.2g')}, n = {c['n_group']})")  # fmt: skip
    return f"{head}; {mde_phrase(c, config)}."


def mde_phrase(c: dict[str, Any], config: AuditConfig) -> str:
    """``a gap under 14.2 points could go unseen here (80% power, ...)`` or why no gap size would be found."""
    if c.get("mde") is None:
        return f"{c.get('mde_note', 'no minimum detectable effect')}: a gap of any size could go unseen here"
    worse = "lower" if higher_is_better(c["metric"]) else "higher"
    ba = c.get("mde_balanced_accuracy")
    return (f"a {label(c['metric'])} {worse} by less than {format_gap(c['metric'], c['mde'])}"
            + (f" (about {format_gap('balanced_accuracy', ba)} of balanced accuracy, if the model's confidence in "
               "the true class fell evenly)" if ba is not None else "")
            + f" could go unseen here ({config.mde_power:.0%} power at alpha {config.alpha} over the family's tests)")


def _mde_range(quiet: list[dict[str, Any]], config: AuditConfig) -> str:
    """The span of the primary tests' minimum detectable effects, for the headline."""
    if not quiet:
        return "no primary comparison could be tested."
    sized = [c for c in quiet if c.get("mde") is not None]
    unsized = sorted({c["group"] for c in quiet if c.get("mde") is None})
    parts = []
    spans = []
    for metric in dict.fromkeys(c["metric"] for c in sized):  # one span per primary metric, in its own units
        mine = [c for c in sized if c["metric"] == metric]
        lo, hi = min(mine, key=lambda c: c["mde"]), max(mine, key=lambda c: c["mde"])
        worse = "lower" if higher_is_better(metric) else "higher"
        span = (f"{format_gap(metric, lo['mde'])} ({lo['group']})" if lo["mde"] == hi["mde"] else
                f"{format_gap(metric, lo['mde'])} ({lo['group']}) to {format_gap(metric, hi['mde'])} ({hi['group']})")
        ba = [c["mde_balanced_accuracy"] for c in mine if c.get("mde_balanced_accuracy") is not None]
        in_ba = (f" (about {100 * min(ba):.1f} to {100 * max(ba):.1f} points of balanced accuracy, if the model's "
                 "confidence in the true class fell evenly)") if ba else ""  # fmt: skip
        spans.append(f"a {label(metric)} {worse} by {span}{in_ba}")
    if spans:
        parts.append(f"with {config.mde_power:.0%} power the primary tests find {' or '.join(spans)}, and smaller "
                     "gaps could go unseen")  # fmt: skip
    if unsized:
        parts.append(f"for {', '.join(unsized)} no gap within the metric's range is found with "
                     f"{config.mde_power:.0%} power")  # fmt: skip
    return "; ".join(parts) + " (see Detectable gaps)."


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


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
