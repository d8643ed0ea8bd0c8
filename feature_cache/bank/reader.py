"""Reading a finished bank: :func:`open_reader` and :class:`BankReader`.

The reader loads the small index (bag ids, CSR offsets, per-bag metadata) once and opens the
feature storage lazily **per process**: it pickles without file handles, so DataLoader workers
(fork or spawn) each open their own, and its methods are safe to call from several threads.
Resident memory is the index plus the bags being read; it does not grow with the bank's size.

Opening checks the layout and that every array's data is stored in full (see
:func:`~feature_cache.bank.layout.check_structure`); every read refuses a missing, short or
undecodable chunk; whole-bag reads (:meth:`BankReader.read`, :meth:`BankReader.read_packed`) check
a bag's stored checksum the first time this process reads the bag (checking every read would
halve the raw read throughput; see ``docs/bank_schema.md``). Any of these raises a one-line
:class:`BankFormatError`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.bank.checksum import checksum_function
from feature_cache.bank.errors import BankError, BankFormatError, UnknownBagError
from feature_cache.bank.inputs import decode_cell_ids
from feature_cache.bank.layout import check_structure, located, open_store
from feature_cache.bank.rowio import IO_MODES, RowSource
from feature_cache.bank.schema import COORDS, FEATURES, INSTANCE_COLUMNS, EncoderInfo, backend_for

log = logging.getLogger("feature_cache.bank")


class BankReader:
    """Random access to the bags of one bank (see the module docstring)."""

    def __init__(self, path: str | Path, *, io: str = "auto", checksums: bool = True) -> None:
        if io not in IO_MODES:
            raise BankError(f"{path}: unknown io mode {io!r} (use {', '.join(IO_MODES)})")
        self._path, self._io, self._check = Path(path), io, bool(checksums)
        self._lock = threading.Lock()
        self._state: tuple[int, Any, dict[str, RowSource]] | None = None
        self._stale: list[Any] = []
        problems, index = check_structure(self._store())
        if index is None:
            self.close()
            more = f" (+{len(problems) - 1} more; run `milcore bank verify`)" if len(problems) > 1 else ""
            raise BankFormatError(f"{located(self._path, problems[0])}{more}")
        self._index = index
        self._hot()
        self._warn_unfinished()

    def _hot(self) -> None:
        """Plain-Python copies of what every read needs (numpy scalar indexing is slow)."""
        self._pos = {bag_id: i for i, bag_id in enumerate(self._index.ids)}
        self._off = self._index.offsets.tolist()
        self._dim, self._dtype = self._index.info.dim, self._index.dtype
        self._feat: tuple[int, RowSource] | None = None
        stored = self._index.checksums
        self._crcs = stored.tolist() if stored is not None and self._check else None
        self._crc = None
        if self._crcs is not None:
            self._crc = checksum_function(str(self._index.checksum_algorithm), str(self._path))
        self._verified = bytearray(len(self._index.ids))  # bags whose checksum this process has checked

    # -- pickling and per-process handles --------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self._path, "io": self._io, "index": self._index, "checksums": self._check}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._path, self._io, self._index = state["path"], state["io"], state["index"]
        self._check = state.get("checksums", True)
        self._lock, self._state, self._stale = threading.Lock(), None, []
        self._hot()

    def _store(self) -> Any:
        state = self._state
        if state is None or state[0] != os.getpid():
            with self._lock:
                state = self._state
                if state is None or state[0] != os.getpid():
                    if state is not None:  # inherited through fork: never touch the parent's handles
                        self._stale.append(state)
                    state = (os.getpid(), open_store(self._path), {})
                    self._state = state
        return state[1]

    def _rows(self, name: str) -> RowSource:
        store = self._store()
        sources = self._state[2]  # type: ignore[index]
        source = sources.get(name)
        if source is None:
            with self._lock:
                source = sources.get(name)
                if source is None:
                    source = sources[name] = store.rows(name, self._io)
        return source

    def _warn_unfinished(self) -> None:
        from feature_cache.bank.journal import journal_dir
        from feature_cache.bank.lock import is_locked

        if journal_dir(self._path).exists() and not is_locked(self._path):
            log.warning(
                "%s: an interrupted write left %s; reopen the writer with mode='a' or run "
                "`milcore bank verify --recover` to add its bags", self._path, journal_dir(self._path)
            )

    def close(self) -> None:
        """Close this process's file handles (the reader reopens them on next use)."""
        state, self._state, self._feat = self._state, None, None
        if state is not None and state[0] == os.getpid():
            for source in state[2].values():
                source.close()
            state[1].close()

    def __enter__(self) -> BankReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- index -----------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The bank's path."""
        return self._path

    @property
    def backend(self) -> str:
        """``"hdf5"`` or ``"zarr"``."""
        return backend_for(self._path)

    @property
    def info(self) -> EncoderInfo:
        """Encoder fingerprint of the features."""
        return self._index.info

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return self._index.info.dim

    @property
    def dtype(self) -> np.dtype:
        """Stored feature dtype."""
        return self._index.dtype

    @property
    def num_instances(self) -> int:
        """Total number of cells ``N``."""
        return int(self._index.offsets[-1])

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (format, format_version, encoder, created, generated_by, ...)."""
        return dict(self._index.attrs)

    @property
    def columns(self) -> tuple[str, ...]:
        """Per-cell columns stored besides the features (``coords`` always; ``cell_id``, ``cell_type``)."""
        return self._index.columns

    @property
    def bag_meta(self) -> dict[str, np.ndarray]:
        """Per-bag metadata columns, each ``(B,)`` in bag order."""
        return dict(self._index.bag_meta)

    @property
    def checksums(self) -> np.ndarray | None:
        """Per-bag checksum of the stored feature bytes ``(B,)`` uint32, or ``None`` if written without."""
        return self._index.checksums

    @property
    def checksum_algorithm(self) -> str | None:
        """``"crc32c"`` or ``"crc32"`` (see :mod:`feature_cache.bank.checksum`), or ``None``."""
        return self._index.checksum_algorithm

    def __len__(self) -> int:
        return len(self._index.ids)

    def __contains__(self, bag_id: object) -> bool:
        return bag_id in self._pos

    def __iter__(self) -> Iterator[str]:
        return iter(self._index.ids)

    def bag_ids(self) -> list[str]:
        """Bag ids in storage order."""
        return list(self._index.ids)

    def offsets(self) -> np.ndarray:
        """CSR offsets ``(B+1,)`` int64: bag ``i`` is rows ``offsets[i]:offsets[i+1]``."""
        return self._index.offsets.copy()

    def bag_sizes(self) -> np.ndarray:
        """Cells per bag ``(B,)``."""
        return np.diff(self._index.offsets)

    def index_of(self, bag_id: str) -> int:
        """Position of ``bag_id``; raises :class:`UnknownBagError`."""
        try:
            return self._pos[bag_id]
        except (KeyError, TypeError):
            raise UnknownBagError(f"{self._path}: unknown bag id {bag_id!r}") from None

    def describe(self) -> dict[str, Any]:
        """Summary for ``milcore bank info``: sizes, dtype, layout, encoder."""
        store = self._store()
        layout = store.describe(FEATURES)
        layout["reader"] = self._rows(FEATURES).layout
        return {
            "path": str(self._path), "backend": self.backend, "bags": len(self),
            "instances": self.num_instances, "dim": self.dim, "dtype": str(self.dtype),
            "columns": list(self.columns), "bag_meta": sorted(self._index.bag_meta),
            "checksums": self.checksum_algorithm, "features": layout,
            "encoder": self.info.to_dict(), "compute_dtype": self.info.compute_dtype,
            **{k: self._index.attrs.get(k) for k in ("format", "format_version", "created", "generated_by")},
        }

    # -- reading ---------------------------------------------------------------------------------
    def _features(self) -> RowSource:
        feat = self._feat
        if feat is None or feat[0] != os.getpid():
            feat = self._feat = (os.getpid(), self._rows(FEATURES))
        return feat[1]

    def read(self, bag_id: str) -> np.ndarray:
        """Features of one bag, ``(n, D)`` in the stored dtype (one contiguous row range)."""
        i = self._pos.get(bag_id)
        if i is None:
            i = self.index_of(bag_id)  # raises UnknownBagError
        a, b = self._off[i], self._off[i + 1]
        out = np.empty((b - a, self._dim), self._dtype)
        self._features().read_into(a, b, out)
        if self._crc is not None and not self._verified[i]:
            self._verify(i, out)
        return out

    def _verify(self, i: int, x: np.ndarray) -> None:
        """Compare bag ``i``'s rows with its stored checksum (once per process and bag)."""
        if self._crc(x) != self._crcs[i]:  # type: ignore[misc, index]
            raise self._corrupt(i, x)
        self._verified[i] = 1

    def _corrupt(self, i: int, x: np.ndarray) -> BankFormatError:
        assert self._crc is not None and self._crcs is not None
        return BankFormatError(
            f"{self._path}: bag {self._index.ids[i]!r}: {self._index.checksum_algorithm} checksum mismatch "
            f"(stored {self._crcs[i]:#010x}, read {self._crc(x):#010x}); its features are damaged "
            "(run `milcore bank verify` for the full list)"
        )

    def read_many(self, bag_ids: Iterable[str]) -> list[np.ndarray]:
        """:meth:`read` for each id, in order."""
        return [self.read(bag_id) for bag_id in bag_ids]

    def read_packed(self, bag_ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Features of several bags in one matrix: ``x (N, D)`` and ``ptr (B+1,)`` int64."""
        return self._packed(FEATURES, list(bag_ids), (self.dim,), self.dtype)

    def read_packed_coords(self, bag_ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates of several bags: ``coords (N, 2)`` int32 and ``ptr (B+1,)``."""
        return self._packed(COORDS, list(bag_ids), (2,), np.dtype(np.int32))

    def _packed(
        self, name: str, ids: list[str], tail: tuple[int, ...], dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        pos = [self.index_of(bag_id) for bag_id in ids]
        off = self._off
        bounds = [0]
        for i in pos:
            bounds.append(bounds[-1] + off[i + 1] - off[i])
        out = np.empty((bounds[-1], *tail), dtype)
        rows = self._features() if name == FEATURES else self._rows(name)
        crc = self._crc if name == FEATURES else None
        for j, i in enumerate(pos):
            part = out[bounds[j] : bounds[j + 1]]
            rows.read_into(off[i], off[i + 1], part)
            if crc is not None and not self._verified[i]:
                self._verify(i, part)
        return out, np.asarray(bounds, np.int64)

    def read_coords(self, bag_id: str) -> np.ndarray:
        """Cell coordinates of one bag, ``(n, 2)`` int32 (``-1`` where unknown)."""
        return self.read_column(bag_id, "coords")

    def read_column(self, bag_id: str, name: str) -> np.ndarray:
        """A per-cell column of one bag: ``coords`` (n, 2) int32, ``cell_id`` (n,) str or ``cell_type`` (n,) str."""
        if name not in self._index.columns:
            raise BankError(f"{self._path}: has no per-cell column '{name}' (has {', '.join(self.columns)})")
        i = self.index_of(bag_id)
        a, b = int(self._index.offsets[i]), int(self._index.offsets[i + 1])
        dtype, width, _ = INSTANCE_COLUMNS[name]
        out = np.empty((b - a, width) if width > 1 else (b - a,), dtype)
        self._rows(f"instances/{name}").read_into(a, b, out)
        if name == "cell_id":
            return decode_cell_ids(out)
        if name != "cell_type":
            return out
        names = np.array([*self._index.cell_type_names, ""], dtype=object)
        if len(out) and (out.min() < -1 or out.max() >= len(names) - 1):
            bad = int(out.min()) if out.min() < -1 else int(out.max())
            raise BankFormatError(
                f"{self._path}: bag {bag_id!r}: 'instances/cell_type' holds code {bad}, but its 'names' attribute "
                f"lists {len(names) - 1} cell types"
            )
        return names[np.where(out < 0, len(names) - 1, out)]

    def read_rows(self, start: int, stop: int, name: str = FEATURES) -> np.ndarray:
        """Raw rows ``start:stop`` of the features (or another per-cell array), for streaming."""
        if name == FEATURES:
            out = np.empty((stop - start, self.dim), self.dtype)
        else:
            dtype, width, _ = INSTANCE_COLUMNS[name.split("/")[-1]]
            out = np.empty((stop - start, width) if width > 1 else (stop - start,), dtype)
        self._rows(name).read_into(start, stop, out)
        return out


def open_reader(path: str | Path, *, io: str = "auto", checksums: bool = True) -> BankReader:
    """Open a bank for reading.

    Args:
        path: a ``.h5``/``.hdf5`` file or ``.zarr`` folder.
        io: ``"auto"`` (direct file reads where the layout allows, else the library), ``"pread"``,
            ``"mmap"`` (memory map; HDF5 contiguous only) or ``"library"`` (h5py / zarr-python).
        checksums: check a bag's stored checksum (when the bank has them) the first time this
            process reads it whole (``read``, ``read_many``, ``read_packed``); ``False`` never does.

    Raises:
        BankFormatError: missing, foreign, wrong ``format_version``, structurally broken or
            incompletely stored bank; a bank still being written (naming the writer's pid).
    """
    return BankReader(path, io=io, checksums=checksums)
