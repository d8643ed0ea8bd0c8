"""Validation of what ``BankWriter.append`` is given (one-line errors naming the bag)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.bank.errors import BankError

_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}
_INT32 = np.iinfo(np.int32)


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN/Inf values of a float16/float32 array (fast: exponent bits only)."""
    utype, mask = _EXPONENT[x.dtype]
    bits = np.bitwise_and(x.view(utype), mask)
    if not x.size or bits.max() != mask:
        return 0
    return int(np.count_nonzero(bits == mask))


def check_compression(backend: str, compression: str | None, path: Path) -> None:
    """Reject compressions the backend lacks (lzf is an HDF5-only filter)."""
    if backend == "zarr" and compression == "lzf":
        raise BankError(f"{path}: lzf is an HDF5 filter; use blosc-zstd or gzip for Zarr banks")


def check_coords(coords: Any, n: int, where: str) -> np.ndarray | None:
    """``(n, 2)`` int32 pixel coordinates (floats are rounded), or ``None``."""
    if coords is None:
        return None
    c = np.asarray(coords)
    if c.size == 0 and n == 0:
        return np.empty((0, 2), np.int32)
    if c.shape != (n, 2) or c.dtype.kind not in "fiu":
        raise BankError(f"{where}: coords have shape {c.shape} ({c.dtype}), expected ({n}, 2) numbers")
    if c.dtype.kind == "f":
        if not np.isfinite(c).all():
            raise BankError(f"{where}: coords contain NaN/Inf")
        c = np.rint(c)
    if c.dtype != np.int32 and c.size and (c.min() < _INT32.min or c.max() > _INT32.max):
        raise BankError(f"{where}: coords exceed the int32 range")
    return c.astype(np.int32, copy=False)


def check_cell_ids(cell_id: Any, n: int, where: str) -> np.ndarray | None:
    """``(n,)`` int64 cell ids, or ``None``."""
    if cell_id is None:
        return None
    c = np.asarray(cell_id).reshape(-1) if np.ndim(cell_id) else np.asarray([cell_id])
    if len(c) != n or (c.size and c.dtype.kind not in "iu"):
        raise BankError(f"{where}: cell_id must be {n} integers, got {c.dtype} {c.shape}")
    return c.astype(np.int64)
