"""Subgroups of an audit: sex, age bands and site from the cohort table, and their pairwise intersections.

Bad metadata never stops an audit: a missing column is skipped and named, unknown sex codes and
non-numeric ages are counted and left out of that attribute's groups (so the patients still count
for the others), and every such decision is returned as a note for the report.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feature_cache.errors import UserError
from milcore.audit.config import AuditConfig

log = logging.getLogger(__name__)

#: Accepted spellings of sex codes (case-insensitive), mapped to ``F``/``M``.
SEX_CODES = {"f": "F", "female": "F", "w": "F", "woman": "F", "weiblich": "F", "frau": "F",
             "m": "M", "male": "M", "man": "M", "männlich": "M", "maennlich": "M", "mann": "M"}  # fmt: skip


@dataclass(frozen=True)
class Subgroup:
    """One group of patients.

    Attributes:
        name: e.g. ``sex=F``, ``age=72-86``, ``sex=F & age=72-86``.
        attribute: ``sex``, ``age``, ``site`` or a pair such as ``sex x age``.
        level: ``attribute`` (one column) or ``intersection`` (two columns).
        mask: (n,) bool, the group's patients.
        scope: (n,) bool, patients whose value of the attribute(s) is known (the group's comparison base).
    """

    name: str
    attribute: str
    level: str
    mask: np.ndarray
    scope: np.ndarray

    @property
    def size(self) -> int:
        """Patients in the group."""
        return int(self.mask.sum())

    @property
    def rest(self) -> np.ndarray:
        """(n,) bool, the known-valued patients outside the group."""
        return self.scope & ~self.mask


@dataclass
class GroupSet:
    """All subgroups of one audit.

    Attributes:
        groups: single-attribute groups first, then intersections.
        values: per attribute, (n,) group value of each patient (``""`` where unknown).
        notes: what was skipped, mapped or left out, one sentence each.
        missing: attributes asked for but absent from the cohort table.
    """

    groups: list[Subgroup]
    values: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def of(self, attribute: str) -> list[Subgroup]:
        """The groups of one attribute (or attribute pair)."""
        return [g for g in self.groups if g.attribute == attribute]


def read_metadata(path: str | Path, bag_ids: list[str]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Metadata columns of a cohort table for ``bag_ids``.

    Returns:
        ``({column: (n,) str array aligned with the matched ids}, matched ids, ids missing from the table)``.

    Raises:
        UserError: unreadable table, no bag-id column, duplicate ids, or no id in common with the predictions.
    """
    from milcore.data.cohort import BAG_ID_COLUMNS, _read_rows, missing_to_empty

    path = Path(path)
    header, rows = _read_rows(path)
    id_col = next((c for c in BAG_ID_COLUMNS if c in header), None)
    if id_col is None:
        raise UserError(f"{path}: no bag-id column (expected one of {', '.join(BAG_ID_COLUMNS)})")
    by_id: dict[str, dict[str, str]] = {}
    for r in rows:
        b = r.get(id_col, "")
        if b in by_id:
            raise UserError(f"{path}: duplicate bag id {b!r} in {id_col!r}")
        by_id[b] = r
    matched = [b for b in bag_ids if b in by_id]
    missing = [b for b in bag_ids if b not in by_id]
    if not matched:
        example = next(iter(by_id), "none")
        raise UserError(f"{path}: no bag id in common with the predictions (e.g. predictions {bag_ids[0]!r}, "
                        f"cohort {example!r}); is this the cohort the run was trained on?")  # fmt: skip
    columns = {c: np.asarray([missing_to_empty(by_id[b].get(c, "")) for b in matched], dtype=object)
               for c in header if c != id_col}  # NA, null, ... read as "" (one definition: data/cohort.py)
    return columns, matched, missing


def _sex_values(raw: np.ndarray, notes: list[str]) -> np.ndarray:
    out = np.asarray([SEX_CODES.get(str(v).strip().lower(), "") for v in raw], dtype=object)
    unknown = Counter(str(v) for v, o in zip(raw, out, strict=True) if o == "" and str(v).strip())
    empty = int(sum(1 for v in raw if not str(v).strip()))
    if unknown:
        codes = ", ".join(f"{k!r} ({n})" for k, n in unknown.most_common(5))
        notes.append(f"sex: unknown codes {codes} left out of the sex groups (accepted: F/M, female/male, w/m)")
    if empty:
        notes.append(f"sex: {empty} patients without a value left out of the sex groups")
    mapped = Counter(str(v) for v, o in zip(raw, out, strict=True) if o and str(v).strip() != o)
    if mapped:
        notes.append("sex: mapped " + ", ".join(f"{k!r}" for k in sorted(mapped)) + " to F/M")
    return out


def _age_values(raw: np.ndarray, bands: tuple[tuple[int, int], ...], notes: list[str]) -> np.ndarray:
    out = np.full(len(raw), "", dtype=object)
    bad: list[str] = []
    outside = 0
    for i, v in enumerate(raw):
        text = str(v).strip()
        if not text:
            continue
        try:
            age = float(text)
        except ValueError:
            bad.append(text)
            continue
        if not np.isfinite(age):
            bad.append(text)
            continue
        band = next((f"{lo}-{hi}" for lo, hi in bands if lo <= age < hi + 1), "")
        outside += band == ""
        out[i] = band
    if bad:
        notes.append(f"age: {len(bad)} non-numeric values (e.g. {', '.join(repr(b) for b in bad[:3])}) left out of "
                     f"the age groups")  # fmt: skip
    empty = int(sum(1 for v in raw if not str(v).strip()))
    if empty:
        notes.append(f"age: {empty} patients without a value left out of the age groups")
    if outside:
        notes.append(f"age: {outside} patients outside every age band left out of the age groups")
    return out


def build_groups(columns: dict[str, np.ndarray], n: int, config: AuditConfig) -> GroupSet:
    """Subgroups of ``n`` patients from their metadata ``columns`` (aligned arrays of strings).

    Raises:
        UserError: none of the audit's attributes is in the table.
    """
    notes: list[str] = []
    values: dict[str, np.ndarray] = {}
    missing = [a for a in config.attributes if a not in columns]
    for a in missing:
        notes.append(f"{a}: no {a!r} column in the cohort table; not audited")
    for a in config.attributes:
        if a not in columns:
            continue
        raw = np.asarray(columns[a], dtype=object)
        if a == "sex":
            values[a] = _sex_values(raw, notes)
        elif a == "age":
            values[a] = _age_values(raw, config.age_bands, notes)
        else:
            values[a] = np.asarray([str(v).strip() for v in raw], dtype=object)
    if not values:
        raise UserError(f"the cohort table has none of the audited columns ({', '.join(config.attributes)})")
    order = {f"{lo}-{hi}": i for i, (lo, hi) in enumerate(config.age_bands)}
    groups: list[Subgroup] = []
    for a, v in values.items():
        scope = v != ""
        for value in sorted({x for x in v if x}, key=lambda x: (order.get(x, 0), _natural(x))):
            groups.append(Subgroup(f"{a}={value}", a, "attribute", (v == value) & scope, scope))
        if len({x for x in v if x}) < 2:
            notes.append(f"{a}: a single value in this cohort; nothing to compare")
    if config.intersections:
        for a, b in itertools.combinations(values, 2):
            va, vb = values[a], values[b]
            scope = (va != "") & (vb != "")
            if len({x for x in va if x}) < 2 or len({x for x in vb if x}) < 2:
                continue
            for g1 in (g for g in groups if g.attribute == a):
                for g2 in (g for g in groups if g.attribute == b):
                    groups.append(Subgroup(f"{g1.name} & {g2.name}", f"{a} x {b}", "intersection",
                                           g1.mask & g2.mask & scope, scope))  # fmt: skip
    return GroupSet(groups, values, notes, missing)


def _natural(text: str) -> tuple:
    """Sort key putting numbers in numeric order (site 2 before site 10)."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)
