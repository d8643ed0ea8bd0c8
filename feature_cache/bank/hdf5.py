"""HDF5 backend (h5py): finishing a journal into a ``.h5`` bank, and reading one.

Uncompressed features are a *contiguous* dataset at byte offset
:data:`~feature_cache.bank.sinks.HDF5_DATA_OFFSET`: the writer stages the rows at that offset of the
future file, and on close builds the HDF5 metadata in a small side file whose alignment settings put
the features dataset exactly there; the metadata bytes are then spliced around the rows. The rows
are written once, and the result is an ordinary HDF5 file any tool reads. Compressed features are
re-encoded on close into a row-chunked dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from feature_cache.bank.errors import BankError, BankFormatError, first_line
from feature_cache.bank.journal import Journal
from feature_cache.bank.rowio import FileRows, LibraryRows, RowSource
from feature_cache.bank.schema import FEATURES, INSTANCE_COLUMNS, META_KINDS
from feature_cache.bank.sinks import HDF5_DATA_OFFSET, RawSink, pwrite_all

#: Readable by HDF5 1.10 and later.
LIBVER = ("earliest", "v110")
_BLOCK_BYTES = 64 << 20
_PLUGIN_FILTERS = {32001, 32015}  # blosc, zstd (need hdf5plugin)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _filter_args(compression: str | None, where: Path) -> dict[str, Any]:
    if compression is None:
        return {}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    try:
        import hdf5plugin
    except ImportError:
        raise BankError(
            f"{where}: blosc-zstd in HDF5 needs the optional package 'hdf5plugin' (pip install hdf5plugin); "
            "lzf and gzip work without it"
        ) from None
    return dict(hdf5plugin.Blosc(cname="zstd", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))


def _block_rows(row_bytes: int, multiple: int = 1) -> int:
    rows = max(1, _BLOCK_BYTES // max(1, row_bytes))
    return max(multiple, rows // multiple * multiple)


# -- writing ---------------------------------------------------------------------------------------
def finalize(journal: Journal, bank: Path) -> Path:
    """Build the finished bank inside the journal folder and return its path."""
    h = journal.header
    N, D, dtype = journal.rows, h.info.dim, np.dtype(h.config.dtype)
    nbytes = N * D * dtype.itemsize
    assert journal.sink is not None
    if h.sink_kind != "hdf5-inplace":
        final = journal.root / "bank.h5"
        with h5py.File(final, "w", libver=LIBVER) as f:
            R = h.chunk_rows
            ds = f.create_dataset(
                FEATURES, shape=(N, D), maxshape=(None, D), chunks=(R, D), dtype=dtype,
                **_filter_args(h.config.compression, bank),
            )
            _copy_sink(journal, ds, _block_rows(D * dtype.itemsize, R))
            _write_common(f, journal)
        return final
    side = journal.root / "meta.h5"
    placed = False
    opts = {"alignment_threshold": max(1, nbytes), "alignment_interval": HDF5_DATA_OFFSET}
    with h5py.File(side, "w", libver=LIBVER, **opts) as f:
        group = f.require_group("instances")
        if N:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            space = h5py.h5s.create_simple((N, D))
            dsid = h5py.h5d.create(group.id, b"features", h5py.h5t.py_create(dtype), space, dcpl=dcpl)
            placed = dsid.get_offset() == HDF5_DATA_OFFSET
            if not placed:  # unexpected allocation: fall back to copying the rows
                _copy_sink(journal, f[FEATURES], _block_rows(D * dtype.itemsize))
        else:
            group.create_dataset("features", shape=(0, D), dtype=dtype)
        _write_common(f, journal)
    if not placed:
        return side
    sink_path = journal.sink.path
    journal.sink.close()
    _splice(side, sink_path, HDF5_DATA_OFFSET, nbytes)
    side.unlink()
    return sink_path


def _copy_sink(journal: Journal, ds: h5py.Dataset, block: int) -> None:
    sink, D, dtype = journal.sink, journal.header.info.dim, np.dtype(journal.header.config.dtype)
    assert isinstance(sink, RawSink)
    for a in range(0, journal.rows, block):
        b = min(journal.rows, a + block)
        ds[a:b] = sink.read(a, b, dtype, D)


def _splice(side: Path, dest: Path, offset: int, nbytes: int) -> None:
    """Copy ``side``'s bytes outside ``[offset, offset+nbytes)`` into ``dest`` (rows stay put)."""
    src, dst = os.open(side, os.O_RDONLY), os.open(dest, os.O_RDWR)
    try:
        size = os.fstat(src).st_size
        if size < offset + nbytes:
            raise BankError(f"{side}: HDF5 metadata file is shorter than its features dataset")
        for start, stop in ((0, offset), (offset + nbytes, size)):
            pos = start
            while pos < stop:
                chunk = os.pread(src, min(stop - pos, 8 << 20), pos)
                pwrite_all(dst, chunk, pos)
                pos += len(chunk)
        os.ftruncate(dst, size)
    finally:
        os.close(src)
        os.close(dst)


def _write_common(f: h5py.File, journal: Journal) -> None:
    """Everything except the features: per-cell columns, bag table, CSR index, attributes."""
    h, N = journal.header, journal.rows
    inst = f.require_group("instances")
    for name, (dtype, width, _) in INSTANCE_COLUMNS.items():
        if name != "coords" and name not in journal.columns:
            continue
        ds = inst.create_dataset(name, shape=(N, width) if width > 1 else (N,), dtype=dtype)
        block = _block_rows(np.dtype(dtype).itemsize * width)
        for a in range(0, N, block):
            ds[a : min(N, a + block)] = journal.read_column(name, a, min(N, a + block))
        if name == "cell_type":
            ds.attrs["names"] = json.dumps(journal.cell_type_names)
    bags = f.create_group("bags")
    bags.create_dataset("bag_id", data=np.array(journal.ids, dtype=object), dtype=h5py.string_dtype())
    if h.config.checksum:
        ds = bags.create_dataset("checksum", data=np.array(journal.crcs, dtype=np.uint32))
        ds.attrs["algorithm"] = h.checksum_algorithm
    for name, (kind, values) in journal.meta_columns().items():
        dt = h5py.string_dtype() if kind == "str" else META_KINDS[kind][0]
        bags.create_dataset(name, data=values, dtype=dt).attrs["kind"] = kind
    offsets = np.zeros(len(journal.ids) + 1, np.int64)
    np.cumsum(journal.sizes, out=offsets[1:])
    f.create_group("indexes").create_dataset("bag_offset", data=offsets)
    f.attrs.update(journal.root_attrs())


def _compression_name(ds: h5py.Dataset) -> str | None:
    if ds.compression in ("gzip", "lzf"):
        return ds.compression
    if "32001" in ds._filters or 32001 in ds._filters:
        return "blosc-zstd"
    other = [str(k) for k in ds._filters if k not in ("shuffle", "fletcher32", "scaleoffset")]
    return ",".join(other) or None


# -- reading ---------------------------------------------------------------------------------------
class Hdf5Store:
    """Read-only view of an HDF5 bank (one per process; see :class:`~feature_cache.bank.reader.BankReader`)."""

    backend = "hdf5"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BankFormatError(f"{self.path}: no such bank file")
        try:
            self.file = h5py.File(self.path, "r", rdcc_nbytes=16 << 20, rdcc_nslots=4001)
        except OSError as exc:
            raise BankFormatError(f"{self.path}: not a readable HDF5 file ({str(exc).splitlines()[0]})") from None
        try:
            self.attrs = {k: _decode(v) for k, v in self.file.attrs.items()}
        except Exception as exc:  # a damaged attribute heap
            self.close()
            raise BankFormatError(f"{self.path}: unreadable root attributes ({first_line(exc)})") from None

    def _dataset(self, name: str) -> h5py.Dataset:
        try:
            node = self.file.get(name)
        except Exception as exc:
            raise BankFormatError(f"{self.path}: unreadable object '{name}' ({first_line(exc)})") from None
        if not isinstance(node, h5py.Dataset):
            raise KeyError(name)
        return node

    def exists(self, name: str) -> bool:
        """Whether dataset ``name`` exists."""
        try:
            self._dataset(name)
        except KeyError:
            return False
        return True

    def children(self, group: str) -> list[str]:
        """Names of the datasets in ``group``."""
        g = self.file.get(group)
        return [k for k, v in g.items() if isinstance(v, h5py.Dataset)] if isinstance(g, h5py.Group) else []

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of dataset ``name``."""
        return tuple(self._dataset(name).shape)

    def dtype(self, name: str) -> np.dtype:
        """Dtype of ``name`` (``object`` for strings)."""
        ds = self._dataset(name)
        return np.dtype(object) if h5py.check_string_dtype(ds.dtype) else ds.dtype

    def array_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of dataset ``name``."""
        try:
            return {k: _decode(v) for k, v in self._dataset(name).attrs.items()}
        except KeyError:
            raise
        except Exception as exc:
            raise BankFormatError(f"{self.path}: unreadable attributes of '{name}' ({first_line(exc)})") from None

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``name`` (whole array by default); strings as ``str`` objects.

        Raises:
            BankFormatError: HDF5 cannot read the data (a truncated or damaged file).
        """
        ds = self._dataset(name)
        self._plugins(ds)
        try:
            if h5py.check_string_dtype(ds.dtype):
                return np.asarray(ds.asstr()[start:stop], dtype=object)
            return ds[start:stop]
        except Exception as exc:
            raise BankFormatError(f"{self.path}: cannot read '{name}' ({first_line(exc)})") from None

    def storage_problems(self, name: str) -> list[str]:
        """Data of ``name`` that lies beyond the end of the file, or was never allocated."""
        ds = self._dataset(name)
        if not ds.size:
            return []
        size = os.path.getsize(self.path)
        layout = ds.id.get_create_plist().get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            offset, want = ds.id.get_offset(), ds.id.get_storage_size()
            if offset is None or not want:
                return [f"{self.path}: '{name}' has no data stored (it would read as the fill value)"]
            if offset + want > size:
                return [f"{self.path}: file is truncated: '{name}' ends at byte {offset + want} but the file has "
                        f"{size} bytes"]
        elif layout == h5py.h5d.CHUNKED:
            chunks = _chunk_extents(ds)
            expected = int(np.prod([-(-n // c) for n, c in zip(ds.shape, ds.chunks, strict=True)]))
            beyond = [end for end in chunks if end > size]
            if beyond:
                return [f"{self.path}: file is truncated: {len(beyond)} chunks of '{name}' lie beyond its end "
                        f"({size} bytes)"]
            if len(chunks) < expected:
                return [f"{self.path}: '{name}' has {expected - len(chunks)} of {expected} chunks missing "
                        "(they would read as the fill value)"]
        return []

    def _plugins(self, ds: h5py.Dataset) -> None:
        if _PLUGIN_FILTERS & set(ds._filters):
            try:
                import hdf5plugin  # noqa: F401  (registers the blosc/zstd filters)
            except ImportError:
                raise BankError(
                    f"{self.path}: '{ds.name}' is blosc/zstd-compressed; install 'hdf5plugin' to read it"
                ) from None

    def describe(self, name: str) -> dict[str, Any]:
        """Storage layout of dataset ``name``."""
        ds = self._dataset(name)
        return {
            "chunks": ds.chunks,
            "compression": _compression_name(ds),
            "offset": ds.id.get_offset(),
            "storage_bytes": ds.id.get_storage_size(),
        }

    def rows(self, name: str, io: str) -> RowSource:
        """Fast row access to ``name``: a file read at the dataset's offset when it is contiguous."""
        ds = self._dataset(name)
        self._plugins(ds)
        offset = ds.id.get_offset()
        direct = ds.chunks is None and not ds._filters and offset is not None and ds.dtype.isnative
        if direct and io != "library":
            mode = "mmap" if io == "mmap" else "pread"
            return FileRows(self.path, offset, tuple(ds.shape), ds.dtype, mode, name)
        return LibraryRows(ds, "chunked (h5py)" if ds.chunks else "contiguous (h5py)", str(self.path), name)

    def close(self) -> None:
        """Close the file."""
        with contextlib.suppress(Exception):  # closing twice or after fork
            self.file.close()


def _chunk_extents(ds: h5py.Dataset) -> list[int]:
    """End byte (offset + size) of every allocated chunk of ``ds``."""
    ends: list[int] = []
    if hasattr(ds.id, "chunk_iter"):
        ds.id.chunk_iter(lambda info: ends.append(info.byte_offset + info.size))
    else:  # pragma: no cover - HDF5 < 1.12.3
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            ends.append(info.byte_offset + info.size)
    return ends
