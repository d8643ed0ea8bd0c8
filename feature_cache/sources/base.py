"""The source protocol: every source yields the cells of one bag (patient, field image or slide).

A source is built with ``create_source(kind, path, **options)`` (see :mod:`.registry`) and answers
two questions: which bags exist (:meth:`BagSource.bag_ids`) and what cells one bag holds
(:meth:`BagSource.iter_cells`, or :meth:`BagSource.read_bag` for the whole bag at once).
Unreadable items are skipped and recorded in :attr:`BagSource.failures`; a source never raises for
one bad image.

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

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from feature_cache.errors import InvalidArgumentError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

UNKNOWN_COORD = -1
"""Coordinate value for cells whose position in a source image is unknown (plain crop folders)."""


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

    def record_failure(self, path: object, reason: str, bag_id: str | None = None) -> SourceFailure:
        """Record (and log) one skipped item; returns the record."""
        failure = SourceFailure(str(path), " ".join(str(reason).split()), bag_id)
        self.failures.append(failure)
        log.warning("skipped %s: %s", failure.path, failure.reason)
        return failure

    def _unknown_bag(self, bag_id: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{self.kind} source has no bag {bag_id!r}")

