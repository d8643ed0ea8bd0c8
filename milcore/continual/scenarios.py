"""Task streams built from a cohort table: class-, domain- and temporal-incremental scenarios.

A :class:`Scenario` is an ordered list of :class:`Task`\\ s over one global class list. Each task holds
its own training and test bags (a stratified, patient-grouped hold-out inside the task, or a split
column of the cohort table), so the accuracy of task ``i`` can be measured after training any task ``j``.

- **class-incremental**: each task adds new diagnoses (``tasks: [[control, ALL], [NPM1, PML::RARA]]``);
  the global class order is the order in which classes arrive, so the seen classes are always a prefix.
- **domain-incremental**: each task is one value of a column (a site with its own staining); every
  task has every class.
- **temporal**: tasks are acquisition periods of a date column (equal-count periods, or explicit
  boundaries), as in a laboratory's daily stream.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from feature_cache.errors import UserError
from milcore.continual.config import ScenarioConfig
from milcore.data.cohort import Cohort

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Task:
    """One task of a stream.

    Attributes:
        name: task name (``"t0: control+ALL"``, ``"site 1"``, ``"2024-01-01..2024-03-31"``).
        classes: global class indices this task trains on.
        train_ids / train_labels: the task's training bags and their global labels.
        test_ids / test_labels: its held-out test bags.
    """

    name: str
    classes: tuple[int, ...]
    train_ids: tuple[str, ...]
    train_labels: np.ndarray
    test_ids: tuple[str, ...]
    test_labels: np.ndarray


@dataclass(frozen=True)
class Scenario:
    """An ordered stream of tasks over one global class list.

    Attributes:
        kind: one of :data:`milcore.continual.config.KINDS`.
        classes: global class names (class-incremental: in order of arrival).
        tasks: the tasks in order.
    """

    kind: str
    classes: tuple[str, ...]
    tasks: tuple[Task, ...] = field(default_factory=tuple)

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.tasks)

    def seen_classes(self, j: int) -> int:
        """Number of classes the head needs after task ``j`` (a prefix of :attr:`classes`)."""
        return 1 + max(c for t in self.tasks[: j + 1] for c in t.classes)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (task names, classes, bag counts)."""
        return {
            "kind": self.kind,
            "classes": list(self.classes),
            "tasks": [
                {
                    "name": t.name,
                    "classes": [self.classes[c] for c in t.classes],
                    "train_bags": len(t.train_ids),
                    "test_bags": len(t.test_ids),
                }
                for t in self.tasks
            ],
        }


def restrict_classes(cohort: Cohort, names: Sequence[str]) -> Cohort:
    """The cohort's bags of the classes ``names`` (others dropped), relabelled in that order.

    Raises:
        UserError: a class not in the cohort.
    """
    unknown = [c for c in names if c not in cohort.classes]
    if unknown:
        raise UserError(f"{cohort.path}: scenario classes not in the cohort: {', '.join(map(repr, unknown))} "
                        f"(cohort classes: {', '.join(cohort.classes)})")  # fmt: skip
    old = np.asarray([cohort.classes.index(c) for c in names])
    keep = np.flatnonzero(np.isin(cohort.labels, old))
    sub = cohort.subset(list(cohort.bag_ids[keep]))
    remap = np.full(len(cohort.classes), -1, dtype=np.int64)
    remap[old] = np.arange(len(names))
    return dataclasses.replace(sub, classes=tuple(names), labels=remap[sub.labels])


def holdout_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified, patient-grouped test mask: about ``fraction`` of each class's patients, at least one.

    Args:
        labels: (B,) labels.
        groups: (B,) patient of each bag (all bags of a patient fall on the same side).
        fraction: share of each class's patients held out.
        seed: random seed.

    Returns:
        (B,) bool, True for test bags.
    """
    rng = np.random.default_rng([seed, 8])
    test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        patients = np.unique(groups[labels == cls].astype(str))
        rng.shuffle(patients)
        n_test = min(len(patients) - 1, max(1, round(fraction * len(patients)))) if len(patients) > 1 else 0
        test |= np.isin(groups.astype(str), patients[:n_test]) & (labels == cls)
    return test


def _split(cohort: Cohort, rows: np.ndarray, spec: ScenarioConfig, seed: int) -> np.ndarray:
    """Test mask over ``rows`` of the cohort (split column, or a stratified grouped hold-out)."""
    column = spec.split_column
    if column:
        if column not in cohort.columns:
            raise UserError(f"{cohort.path}: no split column {column!r} (columns: {', '.join(cohort.columns)})")
        return cohort.columns[column][rows] == spec.test_value
    groups = cohort.groups[rows] if cohort.groups is not None else cohort.bag_ids[rows]
    return holdout_split(cohort.labels[rows], groups, spec.test_fraction, seed)


def _task(cohort: Cohort, name: str, rows: np.ndarray, classes: tuple[int, ...], names: Sequence[str],
          spec: ScenarioConfig, seed: int) -> Task:  # fmt: skip
    test = _split(cohort, rows, spec, seed)
    labels = cohort.labels[rows]
    for part, mask in (("training", ~test), ("test", test)):
        missing = [names[c] for c in classes if not np.any(labels[mask] == c)]
        if missing:
            raise UserError(f"{cohort.path}: scenario task {name!r} has no {part} samples of class "
                            f"{', '.join(map(repr, missing))}")  # fmt: skip
    ids = cohort.bag_ids[rows]
    return Task(name, classes, tuple(ids[~test]), labels[~test].astype(np.int64), tuple(ids[test]),
                labels[test].astype(np.int64))  # fmt: skip


def build_scenario(cohort: Cohort, spec: ScenarioConfig | Mapping[str, Any], seed: int = 0) -> Scenario:
    """Build a scenario from a cohort table and its :class:`~milcore.continual.config.ScenarioConfig`.

    Args:
        cohort: the cohort table (its ``classes`` must be the scenario's global class list; for a
            class-incremental stream, read it with ``classes=`` the concatenated task classes).
        spec: the scenario (or its YAML mapping): ``kind`` plus, per kind, ``tasks``
            (class-incremental: list of class-name lists), ``column`` and optional ``values``
            (domain-incremental), ``column`` (default ``date``) and ``periods`` or ``boundaries``
            (temporal); optional ``test_fraction`` (0.3) or ``split_column``/``test_value``.
        seed: seed of the hold-out split (fixed across strategies and training seeds).

    Raises:
        UserError: unknown kind, unknown class, a class in two tasks, a task without samples of one
            of its classes (in its training or its test part), a missing column.
    """
    if not isinstance(spec, ScenarioConfig):
        spec = ScenarioConfig.from_dict(spec, where="scenario")  # kind, tasks (each class once), keys of the kind
    kind = spec.kind
    names = cohort.classes
    tasks: list[Task] = []
    if kind == "class_incremental":
        groups = spec.tasks or ()
        flat = [c for g in groups for c in g]
        unknown = [c for c in flat if c not in names]
        if unknown:
            raise UserError(f"{cohort.path}: scenario classes not in the cohort: {', '.join(map(repr, unknown))}")
        if list(names[: len(flat)]) != flat:
            raise UserError("scenario: read the cohort with classes= the tasks' classes in order")
        for j, g in enumerate(groups):
            cls = tuple(names.index(str(c)) for c in g)
            rows = np.flatnonzero(np.isin(cohort.labels, cls))
            tasks.append(_task(cohort, f"t{j}: {'+'.join(map(str, g))}", rows, cls, names, spec, seed))
    elif kind == "domain_incremental":
        column = spec.column or "site"
        values = _column(cohort, column)
        order = list(spec.values) if spec.values is not None else sorted(set(values.tolist()), key=_natural)
        for v in order:
            rows = np.flatnonzero(values == v)
            if len(rows) == 0:
                raise UserError(f"{cohort.path}: scenario task {column}={v!r} has no bags")
            tasks.append(_task(cohort, f"{column} {v}", rows, tuple(range(len(names))), names, spec, seed))
    else:
        column = spec.column or "date"
        values = _column(cohort, column)
        bounds = _periods(values, spec, cohort)
        for lo, hi in itertools.pairwise(bounds):
            last = hi == bounds[-1]
            rows = np.flatnonzero((values >= lo) & ((values <= hi) if last else (values < hi)))
            name = f"{lo}..{hi}"
            if len(rows) == 0:
                raise UserError(f"{cohort.path}: scenario period {name} has no bags")
            tasks.append(_task(cohort, name, rows, tuple(range(len(names))), names, spec, seed))
    scenario = Scenario(kind, tuple(names), tuple(tasks))
    log.info("scenario %s: %d tasks over %d classes", kind, len(tasks), len(names))
    return scenario


def _natural(value: str) -> tuple[int, Any]:
    return (0, int(value)) if value.lstrip("-").isdigit() else (1, value)


def _column(cohort: Cohort, column: str) -> np.ndarray:
    if column not in cohort.columns:
        raise UserError(f"{cohort.path}: no column {column!r} for the scenario (columns: {', '.join(cohort.columns)})")
    return cohort.columns[column].astype(str)


def _periods(values: np.ndarray, spec: ScenarioConfig, cohort: Cohort) -> list[str]:
    """Period boundaries (ISO strings sort like dates): explicit (checked increasing), or equal-count quantiles."""
    if spec.boundaries is not None:
        return list(spec.boundaries)
    periods = spec.periods or 3
    ordered = np.sort(values)
    cuts = [ordered[min(len(ordered) - 1, (len(ordered) * k) // periods)] for k in range(1, periods)]
    bounds = [ordered[0], *cuts, ordered[-1]]
    if len(set(bounds)) != len(bounds):
        raise UserError(f"{cohort.path}: too few distinct dates for {periods} periods")
    return [str(b) for b in bounds]
