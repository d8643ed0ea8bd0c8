"""Reading a finished bank: :func:`open_reader` and :class:`BankReader`.

The reader loads the small index (bag ids, CSR offsets, per-bag metadata) once and opens the
feature storage lazily **per process**: it pickles without file handles, so DataLoader workers
(fork or spawn) each open their own, and its methods are safe to call from several threads.
Resident memory is the index plus the bags being read; it does not grow with the bank's size.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.bank.errors import BankError, BankFormatError, UnknownBagError
from feature_cache.bank.rowio import IO_MODES, RowSource
from feature_cache.bank.schema import (
    BAG_ID,
    BAG_OFFSET,
    CHECKSUM,
    COORDS,
    FEATURE_DTYPES,
    FEATURES,
    FORMAT,
    INSTANCE_COLUMNS,
    RESERVED_BAG_COLUMNS,
    SUPPORTED_MAJOR,
    EncoderInfo,
    backend_for,
)

log = logging.getLogger("feature_cache.bank")


def open_store(path: str | Path) -> Any:
    """The backend's read-only store view for ``path`` (``Hdf5Store`` or ``ZarrStore``)."""
    if backend_for(path) == "hdf5":
        from feature_cache.bank.hdf5 import Hdf5Store

        return Hdf5Store(Path(path))
    from feature_cache.bank.zarr_store import ZarrStore

    return ZarrStore(Path(path))


@dataclass
class BankIndex:
    """The small, always-loaded part of a bank."""

    info: EncoderInfo
    ids: list[str]
    offsets: np.ndarray  # (B+1,) int64
    dtype: np.dtype
    attrs: dict[str, Any]
    columns: tuple[str, ...]
    bag_meta: dict[str, np.ndarray] = field(default_factory=dict)
    checksums: np.ndarray | None = None
    cell_type_names: list[str] = field(default_factory=list)


def check_structure(store: Any) -> tuple[list[str], BankIndex | None]:
    """Check a store against the schema; returns (problems, index or ``None`` if any problem)."""
    attrs = store.attrs
    fmt = attrs.get("format")
    if fmt != FORMAT:
        what = "no 'format' attribute" if fmt is None else f"format {fmt!r}, expected {FORMAT!r}"
        return [f"not a feature bank ({what})"], None
    version = str(attrs.get("format_version", ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = -1
    if major != SUPPORTED_MAJOR:
        return [f"format_version {version!r} is not supported (this version reads {SUPPORTED_MAJOR}.x)"], None
    problems: list[str] = []
    info = None
    try:
        info = EncoderInfo.from_dict(attrs["encoder"])
    except (KeyError, BankError) as exc:
        problems.append(f"bad 'encoder' attribute ({exc})")
    problems += [f"missing dataset '{n}'" for n in (FEATURES, COORDS, BAG_ID, BAG_OFFSET) if not store.exists(n)]
    if problems:
        return problems, None
    assert info is not None
    shape, dtype = store.shape(FEATURES), store.dtype(FEATURES)
    if len(shape) != 2 or shape[1] != info.dim:
        problems.append(f"'{FEATURES}' has shape {shape}, expected (N, {info.dim}) from the encoder fingerprint")
    if str(dtype) not in FEATURE_DTYPES:
        problems.append(f"'{FEATURES}' has dtype {dtype}, expected float16 or float32")
    N = shape[0]
    ids = [str(i) for i in store.read(BAG_ID)]
    B = len(ids)
    offsets = np.asarray(store.read(BAG_OFFSET))
    problems += _offset_problems(offsets, ids, N)
    seen: set[str] = set()
    for bag_id in ids:
        if not bag_id or bag_id in seen:
            problems.append(f"{'empty' if not bag_id else 'duplicate'} bag id {bag_id!r} in '{BAG_ID}'")
            break
        seen.add(bag_id)
    columns = []
    for name, (_, width, _) in INSTANCE_COLUMNS.items():
        path = f"instances/{name}"
        if store.exists(path):
            columns.append(name)
            want = (N, width) if width > 1 else (N,)
            if store.shape(path) != want:
                problems.append(f"'{path}' has shape {store.shape(path)}, expected {want}")
    meta: dict[str, np.ndarray] = {}
    for name in store.children("bags"):
        if store.shape(f"bags/{name}") != (B,):
            problems.append(f"'bags/{name}' has shape {store.shape(f'bags/{name}')}, expected ({B},)")
        elif name not in RESERVED_BAG_COLUMNS:
            meta[name] = store.read(f"bags/{name}")
    if problems:
        return problems, None
    checksums = store.read(CHECKSUM).astype(np.uint32) if store.exists(CHECKSUM) else None
    names = []
    if "cell_type" in columns:
        import json

        names = list(json.loads(store.array_attrs("instances/cell_type").get("names", "[]")))
    index = BankIndex(info, ids, offsets.astype(np.int64), np.dtype(dtype), dict(attrs), tuple(columns),
                      meta, checksums, names)
    return problems, index


def _offset_problems(offsets: np.ndarray, ids: list[str], n_rows: int) -> list[str]:
    B = len(ids)
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
        return [f"'{BAG_OFFSET}' must be a 1-D integer array, got {offsets.dtype} {offsets.shape}"]
    if len(offsets) != B + 1:
        return [f"'{BAG_OFFSET}' has {len(offsets)} entries for {B} bags (expected {B + 1})"]
    out = []
    if offsets[0] != 0:
        out.append(f"'{BAG_OFFSET}' starts at {offsets[0]}, expected 0")
    bad = np.flatnonzero(np.diff(offsets) < 0)
    if bad.size:
        i = int(bad[0])
        out.append(f"'{BAG_OFFSET}' decreases at bag {i} ({ids[i]!r}): {offsets[i]} -> {offsets[i + 1]}")
    if offsets[-1] != n_rows:
        out.append(f"'{BAG_OFFSET}' ends at {offsets[-1]} but '{FEATURES}' has {n_rows} rows")
    return out


class BankReader:
    """Random access to the bags of one bank (see the module docstring)."""

    def __init__(self, path: str | Path, *, io: str = "auto") -> None:
        if io not in IO_MODES:
            raise BankError(f"{path}: unknown io mode {io!r} (use {', '.join(IO_MODES)})")
        self._path, self._io = Path(path), io
        self._lock = threading.Lock()
        self._state: tuple[int, Any, dict[str, RowSource]] | None = None
        self._stale: list[Any] = []
        problems, index = check_structure(self._store())
        if index is None:
            self.close()
            more = f" (+{len(problems) - 1} more; run `milcore bank verify`)" if len(problems) > 1 else ""
            raise BankFormatError(f"{self._path}: {problems[0]}{more}")
        self._index = index
        self._pos = {bag_id: i for i, bag_id in enumerate(index.ids)}
        self._warn_unfinished()

    # -- pickling and per-process handles --------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self._path, "io": self._io, "index": self._index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._path, self._io, self._index = state["path"], state["io"], state["index"]
        self._lock, self._state, self._stale = threading.Lock(), None, []
        self._pos = {bag_id: i for i, bag_id in enumerate(self._index.ids)}

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
        state, self._state = self._state, None
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
        """Per-bag CRC-32 of the stored feature bytes, or ``None`` if written without."""
        return self._index.checksums

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
            "checksums": self.checksums is not None, "features": layout,
            "encoder": self.info.to_dict(),
            **{k: self._index.attrs.get(k) for k in ("format", "format_version", "created", "generated_by")},
        }

    # -- reading ---------------------------------------------------------------------------------
    def read(self, bag_id: str) -> np.ndarray:
        """Features of one bag, ``(n, D)`` in the stored dtype (one contiguous row range)."""
        i = self.index_of(bag_id)
        a, b = int(self._index.offsets[i]), int(self._index.offsets[i + 1])
        out = np.empty((b - a, self.dim), self.dtype)
        self._rows(FEATURES).read_into(a, b, out)
        return out

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
        offsets = self._index.offsets
        ptr = np.zeros(len(ids) + 1, np.int64)
        for j, i in enumerate(pos):
            ptr[j + 1] = ptr[j] + offsets[i + 1] - offsets[i]
        out = np.empty((int(ptr[-1]), *tail), dtype)
        rows = self._rows(name)
        for j, i in enumerate(pos):
            rows.read_into(int(offsets[i]), int(offsets[i + 1]), out[ptr[j] : ptr[j + 1]])
        return out, ptr

    def read_coords(self, bag_id: str) -> np.ndarray:
        """Cell coordinates of one bag, ``(n, 2)`` int32 (``-1`` where unknown)."""
        return self.read_column(bag_id, "coords")

    def read_column(self, bag_id: str, name: str) -> np.ndarray:
        """A per-cell column of one bag: ``coords`` (n, 2), ``cell_id`` (n,) or ``cell_type`` (n,) str."""
        if name not in self._index.columns:
            raise BankError(f"{self._path}: has no per-cell column '{name}' (has {', '.join(self.columns)})")
        i = self.index_of(bag_id)
        a, b = int(self._index.offsets[i]), int(self._index.offsets[i + 1])
        dtype, width, _ = INSTANCE_COLUMNS[name]
        out = np.empty((b - a, width) if width > 1 else (b - a,), dtype)
        self._rows(f"instances/{name}").read_into(a, b, out)
        if name != "cell_type":
            return out
        names = np.array([*self._index.cell_type_names, ""], dtype=object)
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


def open_reader(path: str | Path, *, io: str = "auto") -> BankReader:
    """Open a bank for reading.

    Args:
        path: a ``.h5``/``.hdf5`` file or ``.zarr`` folder.
        io: ``"auto"`` (direct file reads where the layout allows, else the library), ``"pread"``,
            ``"mmap"`` (memory map; HDF5 contiguous only) or ``"library"`` (h5py / zarr-python).

    Raises:
        BankFormatError: missing, foreign, wrong ``format_version`` or structurally broken bank.
    """
    return BankReader(path, io=io)
