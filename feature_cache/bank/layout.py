"""Checking a store against the schema (used when a reader opens a bank, and by ``verify``).

:func:`check_structure` returns every problem it finds as a one-line message, and the small
always-loaded index (:class:`BankIndex`) when there is none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.bank.errors import BankError
from feature_cache.bank.schema import (
    BAG_ID,
    BAG_OFFSET,
    CHECKSUM,
    COORDS,
    FEATURE_DTYPES,
    FEATURES,
    FORMAT,
    INSTANCE_COLUMNS,
    RESERVED_BAG_COLUMNS,
    SUPPORTED_MAJOR,
    EncoderInfo,
    backend_for,
)


def open_store(path: str | Path) -> Any:
    """The backend's read-only store view for ``path`` (``Hdf5Store`` or ``ZarrStore``)."""
    if backend_for(path) == "hdf5":
        from feature_cache.bank.hdf5 import Hdf5Store

        return Hdf5Store(Path(path))
    from feature_cache.bank.zarr_store import ZarrStore

    return ZarrStore(Path(path))


@dataclass
class BankIndex:
    """The small, always-loaded part of a bank."""

    info: EncoderInfo
    ids: list[str]
    offsets: np.ndarray  # (B+1,) int64
    dtype: np.dtype
    attrs: dict[str, Any]
    columns: tuple[str, ...]
    bag_meta: dict[str, np.ndarray] = field(default_factory=dict)
    checksums: np.ndarray | None = None
    cell_type_names: list[str] = field(default_factory=list)


def check_structure(store: Any) -> tuple[list[str], BankIndex | None]:
    """Check a store against the schema; returns (problems, index or ``None`` if any problem)."""
    attrs = store.attrs
    fmt = attrs.get("format")
    if fmt != FORMAT:
        what = "no 'format' attribute" if fmt is None else f"format {fmt!r}, expected {FORMAT!r}"
        return [f"not a feature bank ({what})"], None
    version = str(attrs.get("format_version", ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = -1
    if major != SUPPORTED_MAJOR:
        return [f"format_version {version!r} is not supported (this version reads {SUPPORTED_MAJOR}.x)"], None
    problems: list[str] = []
    info = None
    try:
        info = EncoderInfo.from_dict(attrs["encoder"])
    except (KeyError, BankError) as exc:
        problems.append(f"bad 'encoder' attribute ({exc})")
    problems += [f"missing dataset '{n}'" for n in (FEATURES, COORDS, BAG_ID, BAG_OFFSET) if not store.exists(n)]
    if problems:
        return problems, None
    assert info is not None
    shape, dtype = store.shape(FEATURES), store.dtype(FEATURES)
    if len(shape) != 2 or shape[1] != info.dim:
        problems.append(f"'{FEATURES}' has shape {shape}, expected (N, {info.dim}) from the encoder fingerprint")
    if str(dtype) not in FEATURE_DTYPES:
        problems.append(f"'{FEATURES}' has dtype {dtype}, expected float16 or float32")
    N = shape[0]
    ids = [str(i) for i in store.read(BAG_ID)]
    B = len(ids)
    offsets = np.asarray(store.read(BAG_OFFSET))
    problems += _offset_problems(offsets, ids, N)
    seen: set[str] = set()
    for bag_id in ids:
        if not bag_id or bag_id in seen:
            problems.append(f"{'empty' if not bag_id else 'duplicate'} bag id {bag_id!r} in '{BAG_ID}'")
            break
        seen.add(bag_id)
    columns = []
    for name, (_, width, _) in INSTANCE_COLUMNS.items():
        path = f"instances/{name}"
        if store.exists(path):
            columns.append(name)
            want = (N, width) if width > 1 else (N,)
            if store.shape(path) != want:
                problems.append(f"'{path}' has shape {store.shape(path)}, expected {want}")
    meta: dict[str, np.ndarray] = {}
    for name in store.children("bags"):
        if store.shape(f"bags/{name}") != (B,):
            problems.append(f"'bags/{name}' has shape {store.shape(f'bags/{name}')}, expected ({B},)")
        elif name not in RESERVED_BAG_COLUMNS:
            meta[name] = store.read(f"bags/{name}")
    if problems:
        return problems, None
    checksums = store.read(CHECKSUM).astype(np.uint32) if store.exists(CHECKSUM) else None
    names = []
    if "cell_type" in columns:
        names = list(json.loads(store.array_attrs("instances/cell_type").get("names", "[]")))
    index = BankIndex(info, ids, offsets.astype(np.int64), np.dtype(dtype), dict(attrs), tuple(columns),
                      meta, checksums, names)
    return problems, index


def _offset_problems(offsets: np.ndarray, ids: list[str], n_rows: int) -> list[str]:
    B = len(ids)
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
        return [f"'{BAG_OFFSET}' must be a 1-D integer array, got {offsets.dtype} {offsets.shape}"]
    if len(offsets) != B + 1:
        return [f"'{BAG_OFFSET}' has {len(offsets)} entries for {B} bags (expected {B + 1})"]
    out = []
    if offsets[0] != 0:
        out.append(f"'{BAG_OFFSET}' starts at {offsets[0]}, expected 0")
    bad = np.flatnonzero(np.diff(offsets) < 0)
    if bad.size:
        i = int(bad[0])
        out.append(f"'{BAG_OFFSET}' decreases at bag {i} ({ids[i]!r}): {offsets[i]} -> {offsets[i + 1]}")
    if offsets[-1] != n_rows:
        out.append(f"'{BAG_OFFSET}' ends at {offsets[-1]} but '{FEATURES}' has {n_rows} rows")
    return out
