"""``convert``: rewrite a bank with another backend (HDF5 <-> Zarr), dtype, compression or chunking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from feature_cache.bank.merge import merge_banks


def convert_bank(
    source: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    compression: str | None = None,
    chunk_rows: int = 0,
    checksum: bool | None = None,
) -> dict[str, Any]:
    """Copy every bag, column and attribute of ``source`` into a new bank at ``output``.

    The output's suffix picks the backend; ``dtype`` defaults to the source's, ``compression``
    to none, ``checksum`` to the default of new banks (on where a hardware CRC-32C is available).
    Every bag is read (its stored checksum checked) before it is written. Float32 -> float16 conversion fails
    (naming the bag) if a value overflows.

    Returns:
        Summary with ``bags`` and ``instances``.
    """
    summary = merge_banks(
        [source], output, overwrite=overwrite, dtype=dtype, compression=compression, chunk_rows=chunk_rows,
        checksum=checksum,
    )
    summary["source"] = summary.pop("inputs")[0]
    summary.pop("skipped")
    return summary
