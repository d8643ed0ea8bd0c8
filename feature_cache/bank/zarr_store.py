"""Zarr v3 backend (zarr-python): finishing a journal into a ``.zarr`` bank, and reading one.

Uncompressed feature rows are written by the journal straight into the array's chunk files, so
closing only adds the metadata (``zarr.json``) and the small arrays. Reads bypass zarr-python for
row-chunked arrays (see :class:`~feature_cache.bank.rowio.ChunkFileRows`); the store stays a plain
Zarr v3 group that zarr-python and other Zarr readers open.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from feature_cache.bank.errors import BankFormatError
from feature_cache.bank.journal import Journal
from feature_cache.bank.rowio import ChunkFileRows, LibraryRows, RowSource
from feature_cache.bank.schema import INSTANCE_COLUMNS
from feature_cache.bank.sinks import ChunkSink, RawSink

#: Rows per chunk of the per-cell columns (coords, cell ids): uncompressed, read by row ranges.
COLUMN_CHUNK_ROWS = 65536
_BLOCK_BYTES = 64 << 20
#: Chunk files named ``c.<i>.<j>`` in the array's folder (no sub-folder per chunk).
_FLAT = {"name": "default", "separator": "."}


def _compressors(compression: str | None, dtype: np.dtype) -> Any:
    if compression is None:
        return None
    if compression == "gzip":
        return zarr.codecs.GzipCodec(level=4)
    return zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=dtype.itemsize)


def _put(group: zarr.Group, name: str, values: np.ndarray, chunk: int, **kwargs: Any) -> zarr.Array:
    dtype = str if values.dtype == object else values.dtype
    chunks = (max(1, chunk), *values.shape[1:])
    arr = group.create_array(
        name, shape=values.shape, chunks=chunks, dtype=dtype, chunk_key_encoding=_FLAT, **kwargs
    )
    if values.size:
        arr[...] = values
    return arr


def finalize(journal: Journal, bank: Path) -> Path:
    """Build the finished store inside the journal folder and return its path."""
    h = journal.header
    N, D, dtype, R = journal.rows, h.info.dim, np.dtype(h.config.dtype), h.chunk_rows
    store = journal.root / "store.zarr"
    sink = journal.sink
    if isinstance(sink, ChunkSink):
        sink.pad_last_chunk()
    store.mkdir(exist_ok=True)
    root = zarr.open_group(store, mode="a", zarr_format=3)
    inst = root.require_group("instances")
    feats = inst.create_array(
        "features", shape=(N, D), chunks=(R, D), dtype=dtype, fill_value=0, chunk_key_encoding=_FLAT,
        compressors=_compressors(h.config.compression, dtype),
    )
    if isinstance(sink, RawSink):
        block = max(R, _BLOCK_BYTES // (D * dtype.itemsize) // R * R)
        for a in range(0, N, block):
            b = min(N, a + block)
            feats[a:b] = sink.read(a, b, dtype, D)
    for name in INSTANCE_COLUMNS:
        if name == "coords" or name in journal.columns:
            arr = _put(inst, name, journal.read_column(name, 0, N), COLUMN_CHUNK_ROWS, compressors=None)
            if name == "cell_type":
                arr.attrs["names"] = json.dumps(journal.cell_type_names)
    bags = root.require_group("bags")
    B = len(journal.ids)
    _put(bags, "bag_id", np.array(journal.ids, dtype=object), B)
    if h.config.checksum:
        _put(bags, "checksum", np.array(journal.crcs, dtype=np.uint32), B).attrs["algorithm"] = "crc32"
    for name, (kind, values) in journal.meta_columns().items():
        _put(bags, name, values, B).attrs["kind"] = kind
    offsets = np.zeros(B + 1, np.int64)
    np.cumsum(journal.sizes, out=offsets[1:])
    _put(root.require_group("indexes"), "bag_offset", offsets, B + 1)
    root.attrs.update(journal.root_attrs())
    return store


def _is_str(dtype: Any) -> bool:
    return getattr(dtype, "kind", "O") in "OTU"


class ZarrStore:
    """Read-only view of a Zarr v3 bank (one per process)."""

    backend = "zarr"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise BankFormatError(f"{self.path}: no such bank folder")
        if not (self.path / "zarr.json").is_file():
            raise BankFormatError(f"{self.path}: not a Zarr v3 store (no zarr.json)")
        try:
            self.group = zarr.open_group(self.path, mode="r", zarr_format=3)
        except Exception as exc:
            raise BankFormatError(f"{self.path}: not a readable Zarr v3 group ({exc})") from None
        self.attrs = dict(self.group.attrs)

    def _array(self, name: str) -> zarr.Array:
        node = self.group[name]
        if not isinstance(node, zarr.Array):
            raise KeyError(name)
        return node

    def exists(self, name: str) -> bool:
        """Whether array ``name`` exists."""
        try:
            self._array(name)
        except (KeyError, FileNotFoundError):
            return False
        return True

    def children(self, group: str) -> list[str]:
        """Names of the arrays in ``group``."""
        try:
            node = self.group[group]
        except KeyError:
            return []
        return sorted(k for k, _ in node.arrays()) if isinstance(node, zarr.Group) else []

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of array ``name``."""
        return tuple(self._array(name).shape)

    def dtype(self, name: str) -> np.dtype:
        """Dtype of ``name`` (``object`` for strings)."""
        dtype = self._array(name).dtype
        return np.dtype(object) if _is_str(dtype) else np.dtype(dtype)

    def array_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of array ``name``."""
        return dict(self._array(name).attrs)

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``name`` (whole array by default); strings as ``str`` objects."""
        arr = self._array(name)
        values = np.asarray(arr[start:stop]) if arr.size else np.empty(arr.shape, dtype=object)
        return np.array([str(v) for v in values], dtype=object) if _is_str(arr.dtype) else values

    def describe(self, name: str) -> dict[str, Any]:
        """Storage layout of array ``name``."""
        arr = self._array(name)
        return {
            "chunks": arr.chunks,
            "compression": [type(c).__name__ for c in arr.compressors] or None,
            "offset": None,
            "storage_bytes": sum(p.stat().st_size for p in (self.path / name).rglob("*") if p.is_file()),
        }

    def rows(self, name: str, io: str) -> RowSource:
        """Fast row access: direct chunk-file reads when the array layout allows it."""
        if io != "library":
            try:
                meta = json.loads((self.path / name / "zarr.json").read_text())
                return ChunkFileRows(self.path / name, meta)
            except (ValueError, KeyError, TypeError, OSError):
                pass
        return LibraryRows(self._array(name), "zarr-python")

    def close(self) -> None:
        """Nothing to release."""

