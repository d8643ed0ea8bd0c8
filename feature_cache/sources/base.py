"""The source protocol: every source yields the cells of one bag (patient, field image or slide).

A source is built with ``create_source(kind, path, **options)`` (see :mod:`.registry`) and answers
two questions: which bags exist (:meth:`BagSource.bag_ids`) and what cells one bag holds
(:meth:`BagSource.iter_cells`, or :meth:`BagSource.read_bag` for the whole bag at once).
Unreadable items are skipped and recorded in :attr:`BagSource.failures`; a source never raises for
one bad image. An input that must stop the run instead (a "crop" far too large to be a cell)
raises :class:`InputRefusedError`.

:meth:`BagSource.origin` names where a bag comes from and fingerprints it cheaply (file names,
sizes and modification times; the settings that shape its crops), so that resuming an extraction
can check a stored bag against the input it is asked to read.

Implementing a source::

    class MySource(BagSource):
        kind = "mine"

        def __init__(self, path, **options):
            super().__init__()
            ...

        def bag_ids(self) -> list[str]: ...

        def iter_cells(self, bag_id: str) -> Iterator[Cell]: ...

    register_source("mine", MySource)
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from feature_cache.errors import InvalidArgumentError, UserError

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

log = logging.getLogger(__name__)

UNKNOWN_COORD = -1
"""Coordinate value for cells whose position in a source image is unknown (plain crop folders)."""


class InputRefusedError(UserError):
    """An input that must stop the run rather than be skipped as one bad item (the message names it)."""


#: Per-bag metadata columns of a bank that hold a :class:`BagOrigin`.
ORIGIN_COLUMNS = ("source_kind", "source_path", "source_items", "source_settings", "source_digest")


def digest(*parts: object) -> str:
    """SHA-256 (hex) of JSON-serialisable parts, in order."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def file_stamp(path: Path, name: str | None = None) -> tuple[str, int, int]:
    """``(name, size, mtime_ns)`` of a file: a cheap stand-in for its content."""
    st = path.stat()
    return (name if name is not None else path.name, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class BagOrigin:
    """Where a bag came from, as recorded in the bank with its features.

    Attributes:
        kind: source kind (``crops``, ``fields``...).
        path: the bag's folder or file (absolute), or the source's path.
        items: what the bag was read from, counted (files of a crop folder, cells of a synthetic
            patient); -1 when not counted.
        settings: the source settings that shape the crops, as canonical JSON (``"{}"`` if none).
        digest: SHA-256 of the bag's inputs (names, sizes, modification times) and the settings.
        unit: what ``items`` counts (for messages; not stored).
    """

    kind: str
    path: str
    items: int
    settings: str
    digest: str
    unit: str = "items"

    def to_meta(self) -> dict[str, str | int]:
        """Per-bag metadata columns (:data:`ORIGIN_COLUMNS`)."""
        return {"source_kind": self.kind, "source_path": self.path, "source_items": int(self.items),
                "source_settings": self.settings, "source_digest": self.digest}  # fmt: skip

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> BagOrigin | None:
        """The origin stored in a bag's metadata, or ``None`` for a bag written without one."""
        if not meta.get("source_digest"):
            return None
        return cls(str(meta.get("source_kind", "")), str(meta.get("source_path", "")),
                   int(meta.get("source_items", -1)), str(meta.get("source_settings", "{}")),
                   str(meta["source_digest"]))  # fmt: skip

    def _where(self, unit: str) -> str:
        count = f" ({self.items} {unit})" if self.items >= 0 else ""
        return f"{self.path}{count}"

    def difference(self, now: BagOrigin) -> str | None:
        """How ``now`` (the input read today) differs from this recorded origin; ``None`` if it is the same.

        A bag moved with its files unchanged (same names, sizes and times) is the same bag.
        """
        if self.kind != now.kind:
            return f"recorded from a {self.kind} source ({self.path}), now a {now.kind} source ({now.path})"
        if self.settings != now.settings:
            old, new = json.loads(self.settings or "{}"), json.loads(now.settings or "{}")
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            changed = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
            return f"recorded with other source settings ({changed})"
        if self.digest == now.digest:
            return None
        if self.path != now.path or self.items != now.items:
            return f"recorded from {self._where(now.unit)}, now {now._where(now.unit)}"
        return f"recorded from {self._where(now.unit)}, whose files changed since (sizes or modification times)"


@dataclass(frozen=True)
class Cell:
    """One cell crop.

    Attributes:
        pixels: (H, W, 3) uint8 RGB crop.
        coords: (x, y) centre in the source image's pixels (level-0 pixels for slides);
            ``(-1, -1)`` where unknown.
        cell_id: identifier unique within its bag (file stem, or ``wbc0003`` for detections).
        cell_type: cell type when the source knows it (annotation, generator), else ``None``.
    """

    pixels: np.ndarray
    coords: tuple[int, int]
    cell_id: str
    cell_type: str | None = None


@dataclass(frozen=True)
class SourceFailure:
    """An item a source skipped.

    Attributes:
        path: the file (or ``file#region``) that could not be used.
        reason: one line saying why.
        bag_id: the bag it belonged to, where known.
    """

    path: str
    reason: str
    bag_id: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """JSON-ready form for run logs."""
        return {"path": self.path, "reason": self.reason, "bag_id": self.bag_id}


@dataclass(frozen=True)
class CellBatch:
    """All cells of one bag, column-wise.

    Attributes:
        pixels: the crops; either one (n, H, W, 3) uint8 array (same-size crops) or a list of
            n (H_i, W_i, 3) uint8 arrays. Both index as ``pixels[i] -> (H_i, W_i, 3)``.
        coords: (n, 2) int64 (x, y) centres, ``-1`` where unknown.
        cell_ids: n ids, in bag order.
        cell_types: n cell types or ``None``.
        failures: items skipped while reading this bag.
    """

    pixels: np.ndarray | list[np.ndarray]
    coords: np.ndarray
    cell_ids: list[str]
    cell_types: list[str | None]
    failures: tuple[SourceFailure, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.cell_ids)
        if len(self.pixels) != n or len(self.cell_types) != n or self.coords.shape != (n, 2):
            raise InvalidArgumentError(
                f"CellBatch columns disagree: {len(self.pixels)} crops, {len(self.cell_ids)} ids, "
                f"{len(self.cell_types)} types, coords {self.coords.shape}"
            )

    def __len__(self) -> int:
        return len(self.cell_ids)

    def __iter__(self) -> Iterator[Cell]:
        for i, cell_id in enumerate(self.cell_ids):
            x, y = (int(v) for v in self.coords[i])
            yield Cell(self.pixels[i], (x, y), cell_id, self.cell_types[i])

    @classmethod
    def from_cells(cls, cells: Iterable[Cell], failures: Sequence[SourceFailure] = ()) -> CellBatch:
        """Collect cells into a batch; the pixels are stacked when all crops have one shape."""
        import numpy as np

        cells = list(cells)
        pixels: np.ndarray | list[np.ndarray] = [c.pixels for c in cells]
        shapes = {p.shape for p in pixels}
        if len(shapes) == 1:
            pixels = np.stack(pixels)  # (n, H, W, 3)
        coords = np.asarray([c.coords for c in cells], dtype=np.int64).reshape(-1, 2)
        return cls(pixels, coords, [c.cell_id for c in cells], [c.cell_type for c in cells], tuple(failures))


class BagSource(ABC):
    """A collection of bags of cells. Subclasses set :attr:`kind` and implement two methods.

    Sources must be picklable (data-loader workers open their own file handles lazily).
    """

    kind: ClassVar[str] = ""

    def __init__(self) -> None:
        self._failures: list[SourceFailure] = []

    @property
    def failures(self) -> list[SourceFailure]:
        """Items skipped so far (unreadable images, regions), in the order met."""
        if "_failures" not in self.__dict__:  # a subclass that skipped super().__init__()
            self._failures = []
        return self._failures

    @abstractmethod
    def bag_ids(self) -> list[str]:
        """Ids of every bag, sorted, unique."""

    @abstractmethod
    def iter_cells(self, bag_id: str) -> Iterator[Cell]:
        """Yield the cells of one bag in a deterministic order.

        Raises:
            InvalidArgumentError: ``bag_id`` is not one of :meth:`bag_ids`.
        """

    def read_bag(self, bag_id: str) -> CellBatch:
        """All cells of one bag, with the failures met while reading it."""
        start = len(self.failures)
        cells = list(self.iter_cells(bag_id))
        return CellBatch.from_cells(cells, self.failures[start:])

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the source (kind, path, options) for run logs."""
        return {"kind": self.kind}

    def origin(self, bag_id: str) -> BagOrigin:
        """Where ``bag_id`` comes from and a cheap fingerprint of it (see :class:`BagOrigin`).

        The default covers the source's description only (its settings and path); sources reading
        files override it to include each bag's file names, sizes and modification times.
        """
        desc = self.describe()
        settings = json.dumps({k: v for k, v in desc.items() if k not in ("kind", "path")}, sort_keys=True,
                              default=str)  # fmt: skip
        return BagOrigin(self.kind, str(desc.get("path", "")), -1, settings, digest(bag_id, desc))

    def record_failure(self, path: object, reason: str, bag_id: str | None = None) -> SourceFailure:
        """Record (and log) one skipped item; returns the record."""
        failure = SourceFailure(str(path), " ".join(str(reason).split()), bag_id)
        self.failures.append(failure)
        log.warning("skipped %s: %s", failure.path, failure.reason)
        return failure

    def _unknown_bag(self, bag_id: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{self.kind} source has no bag {bag_id!r}")
