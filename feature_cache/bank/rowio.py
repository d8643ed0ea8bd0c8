"""Fast row access for a finished bank: one object per process, safe to share between threads.

- :class:`FileRows`: rows stored contiguously at a byte offset of one file (uncompressed HDF5
  contiguous datasets). ``pread`` copies straight into the caller's buffer; ``mmap`` slices a
  numpy memmap (faster to set up, but the mapped pages count in the process's RSS).
- :class:`ChunkFileRows`: Zarr v3 chunk files read directly (raw ``pread`` of just the needed rows
  for uncompressed chunks; read + decode for blosc/zstd/gzip), bypassing zarr-python's per-slice
  overhead.
- :class:`LibraryRows`: anything else, through h5py or zarr-python slicing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from feature_cache.bank.errors import BankError
from feature_cache.bank.sinks import pread_into

IO_MODES = ("auto", "pread", "mmap", "library")


class RowSource(Protocol):
    """Reads rows ``start:stop`` of one per-row array into a caller-provided buffer."""

    layout: str

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Fill ``out`` (shape ``(stop-start, ...)``, C-contiguous) with the rows."""

    def close(self) -> None:
        """Release file handles."""


class FileRows:
    """Rows at byte ``offset`` of ``path``, read by ``pread`` or through a memmap."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, mode: str) -> None:
        self.path, self.offset, self.shape, self.dtype, self.mode = Path(path), offset, shape, dtype, mode
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.layout = f"contiguous ({mode})"
        self._fd = os.open(self.path, os.O_RDONLY)
        self._mm: np.memmap | None = None
        if mode == "mmap" and shape[0]:
            self._mm = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``start:stop`` into ``out``."""
        if self._mm is not None:
            out[...] = self._mm[start:stop]
        elif stop > start:
            offset = self.offset + start * self.row_bytes
            if os.preadv(self._fd, [out], offset) != out.nbytes:  # short read: finish or fail clearly
                pread_into(self._fd, out, offset, self.path)

    def close(self) -> None:
        """Close the file and drop the map."""
        self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _decoder(codecs: list[dict[str, Any]]) -> Any | None:
    """A numcodecs codec for ``[bytes, <compressor>]`` chains; ``None`` for raw; raises if unsupported."""
    if not codecs or codecs[0].get("name") != "bytes":
        raise ValueError("first codec is not 'bytes'")
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    if endian != "little":
        raise ValueError("big-endian chunks")
    rest = codecs[1:]
    if not rest:
        return None
    if len(rest) > 1:
        raise ValueError("more than one bytes-to-bytes codec")
    import numcodecs

    name = rest[0].get("name")
    if name == "blosc":
        return numcodecs.Blosc()
    if name == "zstd":
        return numcodecs.Zstd()
    if name == "gzip":
        return numcodecs.GZip()
    raise ValueError(f"codec {name!r}")


class ChunkFileRows:
    """Rows of a 2-D or 1-D Zarr v3 array chunked along rows only, read from its chunk files."""

    def __init__(self, array_dir: Path, meta: dict[str, Any]) -> None:
        self.dir = Path(array_dir)
        self.shape = tuple(meta["shape"])
        chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        if meta["chunk_grid"].get("name") != "regular" or tuple(chunks[1:]) != self.shape[1:]:
            raise ValueError("not chunked along rows only")
        enc = meta.get("chunk_key_encoding", {})
        if enc.get("name") != "default":
            raise ValueError("chunk key encoding")
        self.sep = (enc.get("configuration") or {}).get("separator", "/")
        self.rows_per_chunk = int(chunks[0])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        if self.dtype.kind not in "fiub":
            raise ValueError("dtype")
        self.fill = meta.get("fill_value", 0)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.codec = _decoder(meta.get("codecs", []))
        self.layout = f"zarr chunks of {self.rows_per_chunk} rows ({'raw' if self.codec is None else 'decoded'})"
        self._local = threading.local()
        self._all_fds: list[dict[int, int]] = []  # every thread's open chunk files, for close()
        self._fds_lock = threading.Lock()

    def _key(self, k: int) -> Path:
        parts = ["c", str(k)] + ["0"] * (len(self.shape) - 1)
        return self.dir / self.sep.join(parts) if self.sep != "/" else self.dir.joinpath(*parts)

    def _fds(self) -> dict[int, int]:
        try:
            return self._local.fds
        except AttributeError:
            fds = self._local.fds = {}
            with self._fds_lock:
                self._all_fds.append(fds)
            return fds

    def _fd(self, k: int) -> int:
        fds = self._fds()
        fd = fds.get(k)
        if fd is None:
            if len(fds) >= 256:  # bound the open files of this thread
                while fds:
                    os.close(fds.popitem()[1])
            try:
                fd = fds[k] = os.open(self._key(k), os.O_RDONLY)
            except FileNotFoundError:
                return -1
        return fd

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``start:stop`` into ``out``, touching only the chunks that hold them."""
        if stop <= start:
            return
        R = self.rows_per_chunk
        k = start // R
        if self.codec is None and (stop - 1) // R == k:  # the common case: one chunk, one pread
            fd = self._fd(k)
            if fd >= 0:
                offset = (start - k * R) * self.row_bytes
                if os.preadv(fd, [out], offset) != out.nbytes:
                    pread_into(fd, out, offset, self._key(k))
                return
        for k in range(start // R, (stop - 1) // R + 1):
            lo, hi = max(start, k * R), min(stop, (k + 1) * R)
            dst = out[lo - start : hi - start]
            if self.codec is None:
                fd = self._fd(k)
                if fd < 0:
                    dst[...] = self.fill
                else:
                    pread_into(fd, dst, (lo - k * R) * self.row_bytes, self._key(k))
                continue
            try:
                blob = self._key(k).read_bytes()
            except FileNotFoundError:
                dst[...] = self.fill
                continue
            chunk = np.frombuffer(self.codec.decode(blob), dtype=self.dtype)
            if chunk.size * self.dtype.itemsize != R * self.row_bytes:
                raise BankError(f"{self._key(k)}: chunk decodes to {chunk.nbytes} bytes, expected {R * self.row_bytes}")
            dst[...] = chunk.reshape((R, *self.shape[1:]))[lo - k * R : hi - k * R]

    def close(self) -> None:
        """Close the chunk files every thread opened (call when no thread is reading)."""
        with self._fds_lock:
            for fds in self._all_fds:
                while fds:
                    os.close(fds.popitem()[1])


class LibraryRows:
    """Rows read through the array library (h5py dataset or zarr array)."""

    def __init__(self, array: Any, layout: str) -> None:
        self.array, self.layout = array, layout
        self._h5 = hasattr(array, "read_direct")

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``start:stop`` into ``out``."""
        if stop <= start:
            return
        if self._h5:
            self.array.read_direct(out, np.s_[start:stop])
        else:
            out[...] = self.array[start:stop]

    def close(self) -> None:
        """Nothing to release (the store owns the file)."""
