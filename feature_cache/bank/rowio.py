"""Fast row access for a finished bank: one object per process, safe to share between threads.

Every source refuses what it cannot read in full: a missing chunk file, a file or chunk shorter (or
longer) than the array's shape and dtype imply, a chunk that fails to decode. The error is a
one-line :class:`~feature_cache.bank.errors.BankFormatError` naming the file and the array; no
source ever fills the gap with the array's fill value.

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

from feature_cache.bank.errors import BankError, BankFormatError, first_line
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
    """Rows at byte ``offset`` of ``path``, read by ``pread`` or through a memmap.

    The file must hold every row (checked on open; a short ``pread`` later is an error too). A
    memmap cannot report a file truncated while it is mapped (the process gets SIGBUS), so
    ``mmap`` is for files nobody modifies while they are read.
    """

    def __init__(
        self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, mode: str, name: str = ""
    ) -> None:
        self.path, self.offset, self.shape, self.dtype, self.mode = Path(path), offset, shape, dtype, mode
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.layout = f"contiguous ({mode})"
        self._where = f"{self.path} ('{name}')" if name else str(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        end, size = offset + shape[0] * self.row_bytes, os.fstat(self._fd).st_size
        if size < end:
            os.close(self._fd)
            raise BankFormatError(
                f"{self._where}: file is truncated: the array ends at byte {end} but the file has {size} bytes"
            )
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
                pread_into(self._fd, out, offset, self._where)

    def close(self) -> None:
        """Close the file and drop the map."""
        self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def blosc_frame_problem(head: bytes, size: int, expected: int) -> str | None:
    """What is wrong with a Blosc frame of ``size`` bytes starting with ``head`` (>= 16 bytes), or None.

    Blosc trusts its 16-byte header: a truncated frame decodes to garbage without an error (and
    reads past the buffer), so the frame's recorded sizes are checked before it is decoded.
    """
    if size < 16 or len(head) < 16:
        return f"is {size} bytes, shorter than a Blosc header"
    nbytes, cbytes = int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
    if cbytes != size:
        return f"is {size} bytes but its Blosc header says {cbytes} (truncated or resized)"
    if nbytes != expected:
        return f"decodes to {nbytes} bytes by its Blosc header, expected {expected}"
    return None


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
    """Rows of a 2-D or 1-D Zarr v3 array chunked along rows only, read from its chunk files.

    A missing chunk file, a raw chunk of another size than ``rows_per_chunk`` rows, or a compressed
    chunk that does not decode to exactly that many rows is a :class:`BankFormatError`.
    """

    def __init__(self, array_dir: Path, meta: dict[str, Any], name: str = "") -> None:
        self.dir = Path(array_dir)
        self.name = name or self.dir.name
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
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.chunk_bytes = self.rows_per_chunk * self.row_bytes
        self.codec = _decoder(meta.get("codecs", []))
        self.blosc = self.codec is not None and type(self.codec).__name__ == "Blosc"
        self.layout = f"zarr chunks of {self.rows_per_chunk} rows ({'raw' if self.codec is None else 'decoded'})"
        self._local = threading.local()
        self._all_fds: list[dict[int, int]] = []  # every thread's open chunk files, for close()
        self._fds_lock = threading.Lock()

    def _key(self, k: int) -> Path:
        parts = ["c", str(k)] + ["0"] * (len(self.shape) - 1)
        return self.dir / self.sep.join(parts) if self.sep != "/" else self.dir.joinpath(*parts)

    def _rows_of(self, k: int) -> str:
        R = self.rows_per_chunk
        return f"rows {k * R}-{min(self.shape[0], (k + 1) * R) - 1}"

    def _missing(self, k: int) -> BankFormatError:
        return BankFormatError(
            f"{self._key(k)}: chunk file of '{self.name}' is missing ({self._rows_of(k)}); the bank is damaged: "
            "restore the file or rebuild the bank"
        )

    def _bad_size(self, k: int, size: int, what: str = "is") -> BankFormatError:
        return BankFormatError(
            f"{self._key(k)}: chunk of '{self.name}' {what} {size} bytes, expected {self.chunk_bytes} "
            f"({self._rows_of(k)}); the chunk is truncated or resized"
        )

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
                fd = os.open(self._key(k), os.O_RDONLY)
            except FileNotFoundError:
                raise self._missing(k) from None
            size = os.fstat(fd).st_size
            if size != self.chunk_bytes:
                os.close(fd)
                raise self._bad_size(k, size)
            fds[k] = fd
        return fd

    def _pread(self, k: int, out: np.ndarray, offset: int) -> None:
        fd = self._fd(k)
        if os.preadv(fd, [out], offset) != out.nbytes:  # a short read: finish it, or the file shrank
            try:
                pread_into(fd, out, offset, self._key(k))
            except BankError:
                raise self._bad_size(k, os.fstat(fd).st_size, "is now") from None

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``start:stop`` into ``out``, touching only the chunks that hold them."""
        if stop <= start:
            return
        R = self.rows_per_chunk
        k = start // R
        if self.codec is None and (stop - 1) // R == k:  # the common case: one chunk, one pread
            self._pread(k, out, (start - k * R) * self.row_bytes)
            return
        for k in range(start // R, (stop - 1) // R + 1):
            lo, hi = max(start, k * R), min(stop, (k + 1) * R)
            dst = out[lo - start : hi - start]
            if self.codec is None:
                self._pread(k, dst, (lo - k * R) * self.row_bytes)
                continue
            try:
                blob = self._key(k).read_bytes()
            except FileNotFoundError:
                raise self._missing(k) from None
            if self.blosc:
                problem = blosc_frame_problem(blob[:16], len(blob), self.chunk_bytes)
                if problem:
                    raise BankFormatError(f"{self._key(k)}: chunk of '{self.name}' {problem} ({self._rows_of(k)})")
            try:
                raw = self.codec.decode(blob)
            except Exception as exc:  # numcodecs raises RuntimeError, ValueError, ... on a bad frame
                raise BankFormatError(
                    f"{self._key(k)}: chunk of '{self.name}' does not decode ({first_line(exc)}); the chunk is "
                    "damaged"
                ) from None
            nbytes = memoryview(raw).nbytes
            if nbytes != self.chunk_bytes:
                raise BankFormatError(
                    f"{self._key(k)}: chunk of '{self.name}' decodes to {nbytes} bytes, expected {self.chunk_bytes} "
                    f"({self._rows_of(k)})"
                )
            chunk = np.frombuffer(raw, dtype=self.dtype)
            dst[...] = chunk.reshape((R, *self.shape[1:]))[lo - k * R : hi - k * R]

    def close(self) -> None:
        """Close the chunk files every thread opened (call when no thread is reading)."""
        with self._fds_lock:
            for fds in self._all_fds:
                while fds:
                    os.close(fds.popitem()[1])


class LibraryRows:
    """Rows read through the array library (h5py dataset or zarr array).

    ``check(start, stop)`` runs before each read (the Zarr store uses it to refuse missing chunk
    files, which zarr-python would read as the fill value); any library error becomes a
    :class:`BankFormatError` naming ``where`` and the array, or the one returned by
    ``locate(start, stop, exc)`` (the Zarr store names the chunk file that fails).
    """

    def __init__(
        self, array: Any, layout: str, where: str = "", name: str = "", check: Any = None, locate: Any = None
    ) -> None:
        self.array, self.layout, self.where, self.name = array, layout, where, name
        self.check, self.locate = check, locate
        self._h5 = hasattr(array, "read_direct")

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``start:stop`` into ``out``."""
        if stop <= start:
            return
        if self.check is not None:
            self.check(start, stop)
        try:
            if self._h5:
                self.array.read_direct(out, np.s_[start:stop])
            else:
                out[...] = self.array[start:stop]
        except BankError:
            raise
        except Exception as exc:  # h5py OSError on a truncated file; zarr/numcodecs errors on a bad chunk
            if self.locate is not None:
                raise self.locate(start, stop, exc) from None
            raise BankFormatError(
                f"{self.where}: cannot read rows {start}-{stop - 1} of '{self.name}' ({first_line(exc)})"
            ) from None

    def close(self) -> None:
        """Nothing to release (the store owns the file)."""
