"""Zarr v3 backend (zarr-python): finishing a journal into a ``.zarr`` bank, and reading one.

Uncompressed feature rows are written by the journal straight into the array's chunk files, so
closing only adds the metadata (``zarr.json``) and the small arrays. Reads bypass zarr-python for
row-chunked arrays (see :class:`~feature_cache.bank.rowio.ChunkFileRows`); the store stays a plain
Zarr v3 group that zarr-python and other Zarr readers open.

Every chunk of every array is stored, even one that holds only the fill value (zarr-python skips
those by default): since format 1.2 a missing chunk file means a damaged bank, never zeros.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from feature_cache.bank.errors import BankFormatError, first_line
from feature_cache.bank.journal import Journal
from feature_cache.bank.rowio import ChunkFileRows, LibraryRows, RowSource, blosc_frame_problem
from feature_cache.bank.schema import INSTANCE_COLUMNS
from feature_cache.bank.sinks import ChunkSink, RawSink

#: Rows per chunk of the per-cell columns (coords, cell ids): uncompressed, read by row ranges.
COLUMN_CHUNK_ROWS = 65536
_BLOCK_BYTES = 64 << 20
#: Chunk files named ``c.<i>.<j>`` in the array's folder (no sub-folder per chunk).
_FLAT = {"name": "default", "separator": "."}
#: Store every chunk, also one equal to the fill value, so that a missing chunk file is detectable.
_EVERY_CHUNK = {"write_empty_chunks": True}
#: Chunk problems named per array before the rest are counted.
_LIST = 3


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
        name, shape=values.shape, chunks=chunks, dtype=dtype, chunk_key_encoding=_FLAT, config=_EVERY_CHUNK,
        **kwargs,
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
        compressors=_compressors(h.config.compression, dtype), config=_EVERY_CHUNK,
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
        _put(bags, "checksum", np.array(journal.crcs, dtype=np.uint32), B).attrs["algorithm"] = h.checksum_algorithm
    for name, (kind, values) in journal.meta_columns().items():
        _put(bags, name, values, B).attrs["kind"] = kind
    offsets = np.zeros(B + 1, np.int64)
    np.cumsum(journal.sizes, out=offsets[1:])
    _put(root.require_group("indexes"), "bag_offset", offsets, B + 1)
    root.attrs.update(journal.root_attrs())
    return store


def _is_str(dtype: Any) -> bool:
    return getattr(dtype, "kind", "O") in "OTU"


class ChunkGrid:
    """Where the chunk files of one Zarr v3 array are, from its ``zarr.json`` (regular grids only)."""

    def __init__(self, array_dir: Path, meta: dict[str, Any]) -> None:
        self.dir = array_dir
        self.shape = tuple(int(n) for n in meta["shape"])
        grid = meta["chunk_grid"]
        if grid.get("name") != "regular":
            raise ValueError(f"chunk grid {grid.get('name')!r}")
        self.chunks = tuple(int(n) for n in grid["configuration"]["chunk_shape"])
        if len(self.chunks) != len(self.shape) or min(self.chunks, default=1) < 1:
            raise ValueError(f"chunk shape {self.chunks} for shape {self.shape}")
        enc = meta.get("chunk_key_encoding") or {"name": "default"}
        kind = enc.get("name")
        if kind not in ("default", "v2"):
            raise ValueError(f"chunk key encoding {kind!r}")
        self.prefix = ["c"] if kind == "default" else []
        self.sep = (enc.get("configuration") or {}).get("separator", "/" if kind == "default" else ".")
        self.counts = [math.ceil(n / c) for n, c in zip(self.shape, self.chunks, strict=True)]
        codecs = [c.get("name") if isinstance(c, dict) else c for c in meta.get("codecs", [])]
        try:
            itemsize = np.dtype(meta["data_type"]).itemsize
        except TypeError:  # strings: variable length
            itemsize = 0
        self.raw_bytes = math.prod(self.chunks) * itemsize if codecs == ["bytes"] and itemsize else None
        #: Decoded size of a Blosc-compressed numeric chunk, whose header is checked before decoding.
        self.blosc_bytes = math.prod(self.chunks) * itemsize if codecs == ["bytes", "blosc"] and itemsize else None

    def path(self, index: tuple[int, ...]) -> Path:
        """The chunk file of chunk ``index``."""
        parts = [*self.prefix, *(str(i) for i in index)] or ["0"]
        return self.dir / self.sep.join(parts) if self.sep != "/" else self.dir.joinpath(*parts)

    def indices(self, row_start: int = 0, row_stop: int | None = None) -> Iterator[tuple[int, ...]]:
        """Indices of the chunks holding rows ``row_start:row_stop`` (every chunk by default)."""
        if not self.shape:
            yield ()
            return
        if 0 in self.counts:
            return
        R = self.chunks[0]
        stop = self.shape[0] if row_stop is None else min(row_stop, self.shape[0])
        first = range(row_start // R, (stop - 1) // R + 1) if stop > row_start else range(0)
        yield from itertools.product(first, *(range(n) for n in self.counts[1:]))

    def rows(self, index: tuple[int, ...]) -> str:
        """``rows a-b`` of a chunk, for messages."""
        if not index:
            return "the only chunk"
        R = self.chunks[0]
        return f"rows {index[0] * R}-{min(self.shape[0], (index[0] + 1) * R) - 1}"

    def problems(
        self, name: str, row_start: int = 0, row_stop: int | None = None, frames: bool = False
    ) -> list[str]:
        """Missing chunk files and raw chunks of the wrong size, as one-line messages.

        ``frames``: also read the header of each Blosc-compressed chunk (zarr-python decodes a
        truncated Blosc frame into garbage without an error).
        """
        missing: list[tuple[int, ...]] = []
        resized: list[tuple[tuple[int, ...], int]] = []
        for index in self.indices(row_start, row_stop):
            try:
                size = os.stat(self.path(index)).st_size
            except FileNotFoundError:
                missing.append(index)
                continue
            if self.raw_bytes is not None and size != self.raw_bytes:
                resized.append((index, size))
            elif frames and self.blosc_bytes is not None:
                with open(self.path(index), "rb") as fh:
                    problem = blosc_frame_problem(fh.read(16), size, self.blosc_bytes)
                if problem:
                    return [f"{self.path(index)}: chunk of '{name}' {problem} ({self.rows(index)})"]
        out = []
        if missing:
            first = missing[0]
            more = f" ({len(missing)} chunk files missing in all)" if len(missing) > 1 else ""
            out.append(f"{self.path(first)}: chunk file of '{name}' is missing ({self.rows(first)}){more}")
        for index, size in resized[:_LIST]:
            out.append(f"{self.path(index)}: chunk of '{name}' is {size} bytes, expected {self.raw_bytes} "
                       f"({self.rows(index)}); the chunk is truncated or resized")
        if len(resized) > _LIST:
            out.append(f"{self.dir}: {len(resized) - _LIST} more chunks of '{name}' have the wrong size")
        return out


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
            self.attrs = dict(self.group.attrs)
        except Exception as exc:
            raise BankFormatError(f"{self.path}: not a readable Zarr v3 group ({first_line(exc)})") from None

    def _array(self, name: str) -> zarr.Array:
        try:
            node = self.group[name]
        except (KeyError, FileNotFoundError):
            raise KeyError(name) from None
        except Exception as exc:  # a damaged zarr.json
            raise BankFormatError(f"{self.path / name}: unreadable array metadata ({first_line(exc)})") from None
        if not isinstance(node, zarr.Array):
            raise KeyError(name)
        return node

    def _meta(self, name: str) -> dict[str, Any]:
        where = self.path / name / "zarr.json"
        try:
            meta = json.loads(where.read_text())
        except (OSError, ValueError) as exc:
            raise BankFormatError(f"{where}: unreadable array metadata ({first_line(exc)})") from None
        if not isinstance(meta, dict):
            raise BankFormatError(f"{where}: array metadata is not a JSON object")
        return meta

    def grid(self, name: str) -> ChunkGrid:
        """The chunk files of array ``name``."""
        try:
            return ChunkGrid(self.path / name, self._meta(name))
        except (KeyError, TypeError, ValueError) as exc:
            raise BankFormatError(f"{self.path / name}: unsupported chunk layout ({first_line(exc)})") from None

    def storage_problems(self, name: str) -> list[str]:
        """Missing chunk files and raw chunks of the wrong size of array ``name``."""
        return self.grid(name).problems(name)

    def exists(self, name: str) -> bool:
        """Whether array ``name`` exists."""
        try:
            self._array(name)
        except KeyError:
            return False
        return True

    def children(self, group: str) -> list[str]:
        """Names of the arrays in ``group``."""
        try:
            node = self.group[group]
            return sorted(k for k, _ in node.arrays()) if isinstance(node, zarr.Group) else []
        except KeyError:
            return []
        except Exception as exc:
            raise BankFormatError(f"{self.path / group}: unreadable group ({first_line(exc)})") from None

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
        """Rows ``start:stop`` of ``name`` (whole array by default); strings as ``str`` objects.

        Raises:
            BankFormatError: a chunk file is missing, or a chunk does not decode.
        """
        arr = self._array(name)
        problems = self.grid(name).problems(name, start or 0, stop)
        if problems:
            raise BankFormatError(problems[0])
        try:
            values = np.asarray(arr[start:stop]) if arr.size else np.empty(arr.shape, dtype=object)
        except Exception as exc:
            raise BankFormatError(f"{self.path / name}: cannot read '{name}' ({first_line(exc)})") from None
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
                return ChunkFileRows(self.path / name, self._meta(name), name)
            except (ValueError, KeyError, TypeError, BankFormatError):
                pass
        grid = self.grid(name)

        def check(start: int, stop: int) -> None:
            problems = grid.problems(name, start, stop, frames=True)
            if problems:
                raise BankFormatError(problems[0])

        arr = self._array(name)

        def locate(start: int, stop: int, exc: Exception) -> BankFormatError:
            R = grid.chunks[0] if grid.chunks else 1
            for index in grid.indices(start, stop):
                try:
                    arr[index[0] * R : (index[0] + 1) * R]
                except Exception as chunk_exc:
                    return BankFormatError(
                        f"{grid.path(index)}: chunk of '{name}' cannot be read ({first_line(chunk_exc)})"
                    )
            return BankFormatError(f"{self.path}: cannot read rows {start}-{stop - 1} of '{name}' ({first_line(exc)})")

        return LibraryRows(arr, "zarr-python", str(self.path), name, check, locate)

    def close(self) -> None:
        """Nothing to release."""
