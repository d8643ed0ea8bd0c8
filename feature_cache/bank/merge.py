"""``merge`` and the bag-copying core shared by ``convert`` and ``import``.

Merging joins shards written by several ranks (same encoder fingerprint) into one bank. Bag ids
must be unique across shards unless duplicates are skipped (first shard wins). The output is
written through the journal, so an interrupted merge never leaves a half bank behind.

Shards must also share their compute precision (``EncoderInfo.compute_dtype``: a GPU shard computed
under bfloat16 autocast differs from a CPU float32 one by more than the float16 storage rounds away,
so one bank would hold two slightly different feature spaces without saying so); ``unrecorded``
counts as a precision of its own. ``accept_mixed_precision`` merges them anyway and records
``mixed:A+B`` as the bank's precision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.bank.errors import BankError
from feature_cache.bank.reader import BankReader, open_reader
from feature_cache.bank.schema import EncoderInfo
from feature_cache.bank.writer import BankWriter, open_writer

log = logging.getLogger("feature_cache.bank")


def bag_meta_row(reader: BankReader, meta: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Per-bag metadata of bag ``i`` as plain Python values."""
    return {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in meta.items()}


def copy_bags(reader: BankReader, writer: BankWriter, bag_ids: Sequence[str] | None = None, desc: str = "") -> int:
    """Append ``bag_ids`` (default: all) of ``reader`` to ``writer`` with every column; returns the count."""
    from feature_cache.progress import progress

    ids = reader.bag_ids() if bag_ids is None else list(bag_ids)
    meta = reader.bag_meta
    has_id, has_type = "cell_id" in reader.columns, "cell_type" in reader.columns
    for bag_id in progress(ids, desc=desc or f"copying {reader.path.name}", unit="bag"):
        writer.append(
            bag_id,
            reader.read(bag_id),
            reader.read_coords(bag_id),
            cell_id=reader.read_column(bag_id, "cell_id") if has_id else None,
            cell_type=reader.read_column(bag_id, "cell_type") if has_type else None,
            meta=bag_meta_row(reader, meta, reader.index_of(bag_id)),
        )
    return len(ids)


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _merged_info(readers: Sequence[BankReader], accept_mixed: bool) -> EncoderInfo:
    """The first shard's fingerprint, with the precision all shards share (or ``mixed:A+B`` if accepted)."""
    first = readers[0]
    for reader in readers[1:]:
        first.info.check_compatible(reader.info, where=str(reader.path))
    precisions = sorted({r.info.compute_dtype for r in readers})
    if len(precisions) == 1:
        return first.info
    odd = next(r for r in readers if r.info.compute_dtype != first.info.compute_dtype)
    if not accept_mixed:
        raise BankError(
            f"{odd.path}: features computed in {odd.info.compute_dtype}, those of {first.path} in "
            f"{first.info.compute_dtype}; merging them would hide two precisions in one bank (pass "
            "accept_mixed_precision / --accept-mixed-precision to merge anyway, recorded as mixed)"
        )
    flat = sorted({p for v in precisions for p in (v[len("mixed:"):].split("+") if v.startswith("mixed:") else [v])})
    mixed = "mixed:" + "+".join(flat)
    log.warning("merging banks of mixed precision (%s): the merged bank records compute precision %s",
                ", ".join(f"{r.path.name}: {r.info.compute_dtype}" for r in readers), mixed)  # fmt: skip
    return replace(first.info, compute_dtype=mixed)


def merge_banks(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    overwrite: bool = False,
    skip_duplicates: bool = False,
    dtype: str | None = None,
    compression: str | None = None,
    chunk_rows: int = 0,
    checksum: bool | None = None,
    accept_mixed_precision: bool = False,
) -> dict[str, Any]:
    """Merge banks with one encoder fingerprint into ``output``.

    Args:
        inputs: shard banks, in order (HDF5 and Zarr may be mixed).
        output: the merged bank (its suffix picks the backend).
        overwrite: replace an existing ``output`` (else it must not exist).
        skip_duplicates: keep the first copy of a repeated bag id instead of failing.
        dtype: output feature dtype (default: the first shard's).
        compression: output compression (default: none).
        chunk_rows: output chunk rows (0 = automatic).
        checksum: store per-bag checksums (default: as for any new bank, see
            :class:`~feature_cache.bank.schema.WriterConfig`).
        accept_mixed_precision: merge shards computed in different precisions (recorded as
            ``mixed:A+B``) instead of refusing them.

    Returns:
        Summary with ``bags``, ``instances``, ``skipped``, ``inputs`` and ``compute_dtype``.

    Raises:
        BankError: no inputs, output among inputs, encoder mismatch, shards of different compute
            precision (unless accepted), duplicate ids.
    """
    output = Path(output)
    if not inputs:
        raise BankError(f"{output}: nothing to merge (no input banks)")
    for path in inputs:
        if Path(path).exists() and output.exists() and _same_path(Path(path), output):
            raise BankError(f"{output}: the output is also an input")
    readers = [open_reader(p) for p in inputs]
    first = readers[0]
    info = _merged_info(readers, accept_mixed_precision)
    plan: list[list[str]] = []
    seen: dict[str, Path] = {}
    skipped = 0
    for reader in readers:
        first.info.check_compatible(reader.info, where=str(reader.path))
        keep = []
        for bag_id in reader.bag_ids():
            if bag_id in seen:
                if not skip_duplicates:
                    raise BankError(
                        f"{reader.path}: duplicate bag id {bag_id!r} (also in {seen[bag_id]}); "
                        "use --skip-duplicates to keep the first"
                    )
                skipped += 1
                continue
            seen[bag_id] = reader.path
            keep.append(bag_id)
        plan.append(keep)
    writer = open_writer(
        output, info, "w" if overwrite else "x",
        dtype=dtype or str(first.dtype), compression=compression, chunk_rows=chunk_rows,
        checksum=checksum,
    )
    try:
        for reader, keep in zip(readers, plan, strict=True):
            copy_bags(reader, writer, keep)
    except BaseException:
        writer.discard()
        raise
    writer.close()
    for reader in readers:
        reader.close()
    with open_reader(output) as merged:
        summary = {"output": str(output), "inputs": [str(p) for p in inputs], "bags": len(merged),
                   "instances": merged.num_instances, "skipped": skipped, "compute_dtype": info.compute_dtype}
    log.info("merged %d banks into %s: %d bags, %d cells (%d duplicates skipped)",
             len(inputs), output, summary["bags"], summary["instances"], skipped)
    return summary
