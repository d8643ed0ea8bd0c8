"""Append-only row files used by the write journal.

A *sink* receives the feature rows of committed and in-flight bags. Its length is not the truth:
the journal's commit log is, and recovery truncates a sink to the committed row count.

- :class:`RawSink` appends rows to one file from a byte offset. With offset 0 it is a plain
  staging file (compressed banks re-encode it on close); with offset ``HDF5_DATA_OFFSET`` the
  file later *becomes* the HDF5 bank, its rows already at the contiguous dataset's address.
- :class:`ChunkSink` writes rows straight into Zarr v3 chunk files (uncompressed ``bytes`` codec),
  so an uncompressed Zarr bank is never copied either.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from feature_cache.bank.errors import BankError, BankFormatError

#: Byte offset of the features in an uncompressed HDF5 bank (HDF5 metadata lives before and after).
HDF5_DATA_OFFSET = 64 * 1024


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """``os.pwrite`` until every byte is written."""
    view = memoryview(data)
    if not view.nbytes:
        return
    view = view.cast("B")
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def pread_into(fd: int, out: np.ndarray, offset: int, path: Path | str = "") -> None:
    """Fill the C-contiguous array ``out`` from ``fd`` at byte ``offset`` (short file = error)."""
    if not out.nbytes:
        return
    view = memoryview(out).cast("B")
    while view.nbytes:
        got = os.preadv(fd, [view], offset) if hasattr(os, "preadv") else _pread_copy(fd, view, offset)
        if got <= 0:
            raise BankFormatError(f"{path}: file is truncated (wanted {view.nbytes} more bytes at byte {offset})")
        view, offset = view[got:], offset + got


def _pread_copy(fd: int, view: memoryview, offset: int) -> int:  # pragma: no cover - no preadv
    data = os.pread(fd, view.nbytes, offset)
    view[: len(data)] = data
    return len(data)


class RawSink:
    """Rows appended to one file starting at ``offset``."""

    def __init__(self, path: Path, row_bytes: int, *, offset: int = 0, rows: int = 0) -> None:
        self.path, self.row_bytes, self.offset, self.rows = Path(path), row_bytes, offset, rows
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if rows and size < offset + rows * row_bytes:
            raise BankError(f"{self.path}: journal rows are missing ({size} bytes, expected {rows} rows)")
        os.ftruncate(self._fd, offset + rows * row_bytes)

    def append(self, rows: np.ndarray) -> None:
        """Write ``rows`` (C-contiguous, stored dtype) after the last row."""
        pwrite_all(self._fd, memoryview(rows), self.offset + self.rows * self.row_bytes)
        self.rows += len(rows)

    def read(self, start: int, stop: int, dtype: np.dtype, dim: int) -> np.ndarray:
        """Rows ``start:stop`` as an array ``(stop-start, dim)``."""
        out = np.empty((stop - start, dim), dtype)
        pread_into(self._fd, out, self.offset + start * self.row_bytes, self.path)
        return out

    def sync(self) -> None:
        """``fsync`` the file."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ChunkSink:
    """Rows written into Zarr v3 chunk files ``<array>/c.<k>.0`` of ``chunk_rows`` rows each.

    The chunk key encoding is Zarr's ``default`` with separator ``.``: one flat folder of chunk
    files instead of one sub-folder per chunk.
    """

    def __init__(self, array_dir: Path, row_bytes: int, chunk_rows: int, *, rows: int = 0) -> None:
        self.dir, self.row_bytes, self.chunk_rows, self.rows = Path(array_dir), row_bytes, chunk_rows, rows
        self._fd, self._fd_chunk = -1, -1
        self._truncate(rows)

    def chunk_path(self, k: int) -> Path:
        """File of chunk ``k``."""
        return self.dir / f"c.{k}.0"

    def _truncate(self, rows: int) -> None:
        keep = -(-rows // self.chunk_rows)  # chunks holding committed rows
        k = keep
        while self.chunk_path(k).exists():
            self.chunk_path(k).unlink()
            k += 1
        if rows % self.chunk_rows:
            last = self.chunk_path(keep - 1)
            want = (rows % self.chunk_rows) * self.row_bytes
            if not last.exists() or last.stat().st_size < want:
                raise BankError(f"{last}: journal chunk is missing rows")
            os.truncate(last, want)

    def _fd_for(self, k: int) -> int:
        if self._fd_chunk != k:
            self._close_fd()
            path = self.chunk_path(k)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd, self._fd_chunk = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), k
        return self._fd

    def append(self, rows: np.ndarray) -> None:
        """Write ``rows`` after the last row, splitting them at chunk boundaries."""
        done, n = 0, len(rows)
        while done < n:
            row = self.rows + done
            k, r = divmod(row, self.chunk_rows)
            take = min(n - done, self.chunk_rows - r)
            pwrite_all(self._fd_for(k), memoryview(rows[done : done + take]), r * self.row_bytes)
            done += take
        self.rows += n

    def pad_last_chunk(self) -> None:
        """Grow the last chunk file to a full chunk (Zarr expects full-size edge chunks)."""
        self._close_fd()
        if self.rows % self.chunk_rows:
            os.truncate(self.chunk_path(self.rows // self.chunk_rows), self.chunk_rows * self.row_bytes)

    def sync(self) -> None:
        """``fsync`` the chunk being written."""
        if self._fd >= 0:
            os.fsync(self._fd)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._fd_chunk = -1, -1

    def close(self) -> None:
        """Close the open chunk file (idempotent)."""
        self._close_fd()


class ColumnFile:
    """Fixed-width rows of one per-cell column (coords, cell_id, cell_type) in a raw file."""

    def __init__(self, path: Path, dtype: str, width: int, *, rows: int = 0) -> None:
        self.path, self.dtype, self.width = Path(path), np.dtype(dtype), width
        self.row_bytes = self.dtype.itemsize * width
        self.sink = RawSink(self.path, self.row_bytes, rows=rows)

    @property
    def rows(self) -> int:
        """Rows written so far."""
        return self.sink.rows

    def append(self, values: np.ndarray) -> None:
        """Append ``values`` of shape ``(n, width)`` or ``(n,)``."""
        self.sink.append(np.ascontiguousarray(values, dtype=self.dtype))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``; shape ``(n, width)``, or ``(n,)`` for width 1."""
        out = self.sink.read(start, stop, self.dtype, self.width)
        return out[:, 0] if self.width == 1 else out
