"""Per-bag checksums of the stored feature bytes: which algorithm, and how to compute it.

A bank records its algorithm in the ``algorithm`` attribute of ``bags/checksum``:

- ``"crc32c"`` (CRC-32C, Castagnoli): the default for new banks when the hardware-accelerated
  ``google-crc32c`` package is importable with its C extension (~35 GB/s on cached data with SSE4.2 /
  ARMv8 CRC instructions; hashing costs 5-10 % of a bank write, see ``benchmarks/bench_bank_io.py``).
- ``"crc32"`` (zlib's CRC-32): banks written before format 1.2, and new banks on a machine without
  the C extension. ``zlib.crc32`` releases the GIL, so the writer hashes large bags on a helper thread.

Both are computed over the bag's feature bytes as stored (C order, little-endian, stored dtype).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any

from feature_cache.bank.errors import BankFormatError

log = logging.getLogger("feature_cache.bank")

ALGORITHMS = ("crc32c", "crc32")
ChecksumFn = Callable[[Any], int]


def _crc32c() -> tuple[ChecksumFn, bool] | None:
    """(function, hardware) for CRC-32C, or ``None`` when ``google-crc32c`` is not installed."""
    try:
        import google_crc32c
    except ImportError:
        return None
    if google_crc32c.implementation == "c":
        from google_crc32c import _crc32c  # type: ignore[attr-defined]

        return _crc32c.value, True
    return google_crc32c.value, False


def default_algorithm() -> str:
    """``"crc32c"`` when a hardware CRC-32C is available, else ``"crc32"``."""
    fast = _crc32c()
    return "crc32c" if fast is not None and fast[1] else "crc32"


def checksum_function(algorithm: str, where: str) -> ChecksumFn:
    """The function computing ``algorithm`` over a C-contiguous array or bytes.

    Raises:
        BankFormatError: an unknown algorithm (naming ``where``), or ``crc32c`` without ``google-crc32c``.
    """
    if algorithm == "crc32":
        return zlib.crc32
    if algorithm == "crc32c":
        found = _crc32c()
        if found is None:
            raise BankFormatError(
                f"{where}: checksums are CRC-32C; install 'google-crc32c' (pip install google-crc32c) to check them"
            )
        if not found[1]:
            log.warning("%s: google-crc32c has no C extension here; checking CRC-32C checksums is slow", where)
        return found[0]
    raise BankFormatError(
        f"{where}: unknown checksum algorithm {algorithm!r} (this version knows {', '.join(ALGORITHMS)})"
    )


def releases_gil(algorithm: str) -> bool:
    """Whether hashing with ``algorithm`` can overlap other threads (zlib releases the GIL)."""
    return algorithm == "crc32"
