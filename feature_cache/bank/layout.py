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

from feature_cache.bank.checksum import ALGORITHMS
from feature_cache.bank.errors import BankError, BankFormatError
from feature_cache.bank.schema import (
    BAG_ID,
    BAG_OFFSET,
    CELL_TYPE,
    CHECKSUM,
    COORDS,
    EVERY_CHUNK_MINOR,
    FEATURE_DTYPES,
    FEATURES,
    FORMAT,
    INSTANCE_COLUMNS,
    RESERVED_BAG_COLUMNS,
    SUPPORTED_MAJOR,
    EncoderInfo,
    backend_for,
    version_parts,
)


def open_store(path: str | Path) -> Any:
    """The backend's read-only store view for ``path`` (``Hdf5Store`` or ``ZarrStore``).

    Raises:
        BankFormatError: no bank at ``path``; if a write is under way (or was interrupted) the
            message says so, with the writer's pid and the bags committed so far.
    """
    backend = backend_for(path)
    if not Path(path).exists():
        busy = unfinished_write_message(path)
        if busy:
            raise BankFormatError(busy)
    if backend == "hdf5":
        from feature_cache.bank.hdf5 import Hdf5Store

        return Hdf5Store(Path(path))
    from feature_cache.bank.zarr_store import ZarrStore

    return ZarrStore(Path(path))


def unfinished_write_message(path: str | Path, *, finished: bool = False) -> str | None:
    """What a write journal next to ``path`` means, as one line naming the file; ``None`` without one.

    Args:
        path: the bank.
        finished: a finished bank exists at ``path`` (the journal then holds its next version).
    """
    from feature_cache.bank.journal import journal_dir, pending_bags
    from feature_cache.bank.lock import writer_holder

    jdir = journal_dir(path)
    if not jdir.is_dir():
        return None
    bags = pending_bags(jdir)
    holder = writer_holder(path)
    if finished:
        who = f"is being written by {holder}" if holder else f"was interrupted ({jdir})"
        return (f"{path}: a new version {who} ({bags} bags committed so far); readers see the last finished "
                "version until it is done")
    if holder is not None:
        return (f"{path}: is being written by {holder} ({bags} bags committed so far); it can be read once "
                "that writer finishes")
    return (f"{path}: an interrupted write left {jdir} ({bags} bags committed) and no finished bank; run "
            f"`milcore bank verify {path} --recover` to finish it")


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
    checksum_algorithm: str | None = None


#: dtype kind of each per-bag metadata kind ("O" = strings).
_META_DTYPE_KINDS = {"bool": "b", "int": "iu", "float": "f", "str": "O"}


def check_structure(store: Any, *, every_chunk: bool = False) -> tuple[list[str], BankIndex | None]:
    """Check a store against the schema; returns (problems, index or ``None`` if any problem).

    Besides the layout (names, shapes, dtypes, attributes, offsets, bag ids) it checks that the data
    of every array is stored in full: no Zarr chunk file missing or of the wrong size, no HDF5
    dataset reaching past the end of the file. Banks written before format 1.2 may lack Zarr chunks
    that held only the fill value, so there only the features are checked unless ``every_chunk``.
    """
    attrs = store.attrs
    fmt = attrs.get("format")
    if fmt != FORMAT:
        what = "no 'format' attribute" if fmt is None else f"format {fmt!r}, expected {FORMAT!r}"
        return [f"not a feature bank ({what})"], None
    version = str(attrs.get("format_version", ""))
    major, minor = version_parts(version)
    if major != SUPPORTED_MAJOR:
        return [f"format_version {version!r} is not supported (this version reads {SUPPORTED_MAJOR}.x)"], None
    every_chunk = every_chunk or minor >= EVERY_CHUNK_MINOR
    problems: list[str] = []
    info = None
    try:
        info = EncoderInfo.from_dict(attrs["encoder"])
    except KeyError:
        problems.append("no 'encoder' attribute")
    except BankError as exc:
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
    if problems:
        return problems, None
    N = shape[0]
    columns = [name for name in INSTANCE_COLUMNS if store.exists(f"instances/{name}")]
    bag_arrays = store.children("bags")
    arrays = [FEATURES, *(f"instances/{n}" for n in columns), BAG_OFFSET, *(f"bags/{n}" for n in bag_arrays)]
    for name in arrays if every_chunk else [FEATURES]:
        problems += _strip(store.storage_problems(name), store)
    problems += _small_array_problems(store, bag_arrays)
    if problems:
        return problems, None
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
    for name in columns:
        path = f"instances/{name}"
        want_dtype, width, _ = INSTANCE_COLUMNS[name]
        want = (N, width) if width > 1 else (N,)
        if store.shape(path) != want:
            problems.append(f"'{path}' has shape {store.shape(path)}, expected {want}")
        if store.dtype(path) != np.dtype(want_dtype):
            problems.append(f"'{path}' has dtype {store.dtype(path)}, expected {want_dtype}")
    names: list[str] = []
    if "cell_type" in columns:
        names, problem = _cell_type_names(store.array_attrs(CELL_TYPE))
        problems += [problem] if problem else []
    meta: dict[str, np.ndarray] = {}
    for name in bag_arrays:
        path = f"bags/{name}"
        if store.shape(path) != (B,):
            problems.append(f"'{path}' has shape {store.shape(path)}, expected ({B},)")
        elif name not in RESERVED_BAG_COLUMNS:
            problem = _meta_problem(store, path)
            if problem:
                problems.append(problem)
            else:
                meta[name] = store.read(path)
    checksums, algorithm = None, None
    if store.exists(CHECKSUM):
        algorithm = store.array_attrs(CHECKSUM).get("algorithm")
        if algorithm is None:
            problems.append(f"'{CHECKSUM}' has no 'algorithm' attribute")
        elif algorithm not in ALGORITHMS:
            problems.append(f"'{CHECKSUM}' uses unknown algorithm {algorithm!r} (this version knows "
                            f"{', '.join(ALGORITHMS)})")
        if store.dtype(CHECKSUM) != np.uint32:
            problems.append(f"'{CHECKSUM}' has dtype {store.dtype(CHECKSUM)}, expected uint32")
    if problems:
        return problems, None
    if algorithm is not None:
        checksums = np.asarray(store.read(CHECKSUM), dtype=np.uint32)
    index = BankIndex(info, ids, offsets.astype(np.int64), np.dtype(dtype), dict(attrs), tuple(columns),
                      meta, checksums, names, algorithm)
    return problems, index


def located(path: str | Path, problem: str) -> str:
    """``problem`` prefixed with the bank's path, unless it already names a file inside the bank."""
    return problem if problem.startswith(str(path)) else f"{path}: {problem}"


def _strip(problems: list[str], store: Any) -> list[str]:
    """Messages without the leading bank path (callers add it), keeping chunk-file paths."""
    prefix = f"{store.path}: "
    return [p.removeprefix(prefix) for p in problems]


def _small_array_problems(store: Any, bag_arrays: list[str]) -> list[str]:
    """dtype and rank of the per-bag arrays, checked before they are read."""
    out = []
    if store.dtype(BAG_ID) != np.dtype(object) or len(store.shape(BAG_ID)) != 1:
        out.append(f"'{BAG_ID}' must be a 1-D array of strings, got {store.dtype(BAG_ID)} {store.shape(BAG_ID)}")
    shape, dtype = store.shape(BAG_OFFSET), store.dtype(BAG_OFFSET)
    if len(shape) != 1 or dtype.kind not in "iu":
        out.append(f"'{BAG_OFFSET}' must be a 1-D integer array, got {dtype} {shape}")
    return out


def _cell_type_names(attrs: dict[str, Any]) -> tuple[list[str], str | None]:
    raw = attrs.get("names")
    if raw is None:
        return [], f"'{CELL_TYPE}' has no 'names' attribute (the codes cannot be named)"
    try:
        names = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return [], f"'{CELL_TYPE}' attribute 'names' is not a JSON list of strings"
    return names, None


def _meta_problem(store: Any, path: str) -> str | None:
    kind = store.array_attrs(path).get("kind")
    if kind is None:
        return f"'{path}' has no 'kind' attribute"
    if kind not in _META_DTYPE_KINDS:
        return f"'{path}' has unknown kind {kind!r} (use {', '.join(_META_DTYPE_KINDS)})"
    dtype = store.dtype(path)
    if dtype.kind not in _META_DTYPE_KINDS[kind]:
        return f"'{path}' has dtype {dtype}, which does not hold its kind {kind!r}"
    return None


def _offset_problems(offsets: np.ndarray, ids: list[str], n_rows: int) -> list[str]:
    B = len(ids)
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
        return [f"'{BAG_OFFSET}' must be a 1-D integer array, got {offsets.dtype} {offsets.shape}"]
    if len(offsets) != B + 1:
        return [f"'{BAG_OFFSET}' has {len(offsets)} entries for {B} bags (expected {B + 1})"]
    out = []
    if offsets[0] != 0:
        out.append(f"'{BAG_OFFSET}' starts at {offsets[0]}, expected 0")
    bad = np.flatnonzero(np.diff(offsets.astype(np.int64)) < 0)
    if bad.size:
        i = int(bad[0])
        out.append(f"'{BAG_OFFSET}' decreases at bag {i} ({ids[i]!r}): {offsets[i]} -> {offsets[i + 1]}")
    if offsets[-1] != n_rows:
        out.append(f"'{BAG_OFFSET}' ends at {offsets[-1]} but '{FEATURES}' has {n_rows} rows")
    return out
