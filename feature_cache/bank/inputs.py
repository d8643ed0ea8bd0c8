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
    """Cell ids (strings or integers) as an ``(n, CELL_ID_BYTES)`` uint8 matrix of zero-padded UTF-8, or ``None``."""
    from feature_cache.bank.schema import CELL_ID_BYTES

    if cell_id is None:
        return None
    values = list(np.asarray(cell_id, dtype=object).reshape(-1)) if np.ndim(cell_id) else [cell_id]
    if len(values) != n:
        raise BankError(f"{where}: {len(values)} cell ids for {n} cells")
    if any(isinstance(v, float | np.floating) for v in values):
        raise BankError(f"{where}: cell ids must be strings or integers, not floats")
    encoded = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]
    longest = max((len(b) for b in encoded), default=0)
    if longest > CELL_ID_BYTES:
        bad = next(b for b in encoded if len(b) == longest)
        raise BankError(f"{where}: cell id {bad.decode('utf-8', 'replace')!r} is longer than {CELL_ID_BYTES} bytes")
    if n == 0:
        return np.zeros((0, CELL_ID_BYTES), np.uint8)
    packed = np.array(encoded, dtype=f"S{CELL_ID_BYTES}")
    return np.frombuffer(packed.tobytes(), dtype=np.uint8).reshape(n, CELL_ID_BYTES).copy()


def decode_cell_ids(rows: np.ndarray) -> np.ndarray:
    """``(n, CELL_ID_BYTES)`` uint8 rows -> ``(n,)`` object array of str ('' where unknown)."""
    raw = np.ascontiguousarray(rows, dtype=np.uint8)
    flat = raw.view(f"S{raw.shape[1]}").reshape(-1) if raw.size else np.zeros(0, dtype="S1")
    return np.array([b.decode("utf-8", "replace") for b in flat], dtype=object)
