"""Writing a bank: :func:`open_writer` and :class:`BankWriter`.

Bags go to the write journal (:mod:`feature_cache.bank.journal`) and become a finished bank when
the writer closes: a single atomic rename, so readers only ever see complete banks. Modes:
``"x"`` create (fails if the bank or an unfinished write exists), ``"w"`` replace (the old bank
stays until close), ``"a"`` append/resume (creates the bank if missing; after a crash it resumes
the unfinished write, keeping every bag committed before the crash).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.bank.checksum import checksum_function, default_algorithm, releases_gil
from feature_cache.bank.errors import BankError
from feature_cache.bank.inputs import check_cell_ids, check_compression, check_coords, count_nonfinite
from feature_cache.bank.journal import Journal, JournalHeader, finish_commit, journal_dir
from feature_cache.bank.lock import WriterLock
from feature_cache.bank.reader import BankReader, open_reader
from feature_cache.bank.schema import (
    UNRECORDED,
    EncoderInfo,
    WriterConfig,
    backend_for,
    check_bag_id,
    check_meta,
    meta_kind,
    utc_now,
)

log = logging.getLogger("feature_cache.bank")
#: Bags at least this large are hashed on a helper thread while their rows are written (when the
#: algorithm releases the GIL; hardware CRC-32C is fast enough inline).
_ASYNC_HASH_BYTES = 256 << 10


def _finalize(journal: Journal, bank: Path) -> Path:
    if journal.header.backend == "hdf5":
        from feature_cache.bank.hdf5 import finalize
    else:
        from feature_cache.bank.zarr_store import finalize
    return finalize(journal, bank)


class BankWriter:
    """Appends bags to a bank; use as a context manager or call :meth:`close` (see the module doc)."""

    def __init__(self, path: str | Path, info: EncoderInfo | None, mode: str, requested: dict[str, Any]) -> None:
        self.path = Path(path)
        self.backend = backend_for(self.path)
        if mode not in ("w", "a", "x"):
            raise BankError(f"{self.path}: unknown writer mode {mode!r} (use 'x', 'w' or 'a')")
        self.mode = mode
        self._lock = WriterLock(self.path)
        self._lock.acquire()
        self._closed = False
        self._base: BankReader | None = None
        try:
            self._journal = self._open_journal(info, requested)
        except BaseException:
            self._lock.release()
            raise
        h = self._journal.header
        self.info, self.config, self.dtype = h.info, h.config, np.dtype(h.config.dtype)
        self._kinds: dict[str, str] = {}
        for meta in self._journal.metas:
            self._note_kinds(meta)
        if self._base is not None:
            for name, values in self._base.bag_meta.items():
                self._kinds[name] = meta_kind(values[0]) if len(values) else "str"
        self._type_codes = {name: i for i, name in enumerate(self._journal.cell_type_names)}
        self._appended = 0
        algorithm = h.checksum_algorithm
        self._crc = checksum_function(algorithm, str(self.path)) if self.config.checksum else None
        threaded = self._crc is not None and releases_gil(algorithm)
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="bank-crc") if threaded else None

    # -- opening ---------------------------------------------------------------------------------
    def _open_journal(self, info: EncoderInfo | None, requested: dict[str, Any]) -> Journal:
        jdir = journal_dir(self.path)
        journal = None
        if jdir.exists():
            if self.mode == "w":
                shutil.rmtree(jdir)
            else:
                journal = Journal.open(jdir)
                if journal.committed_file is not None:  # crashed during the final rename: finish it
                    finish_commit(journal, self.path)
                    journal = None
                elif self.mode == "x":
                    journal.close_files()
                    raise BankError(
                        f"{self.path}: an unfinished write exists ({jdir}); open with mode 'a' to resume it "
                        "or 'w' to start over"
                    )
        exists = self.path.exists()
        if self.mode == "x" and exists:
            raise BankError(f"{self.path}: already exists (open with mode 'a' to append or 'w' to replace)")
        if journal is not None:
            self._check_same(journal.header.info, journal.header.config, info, requested, str(jdir))
            if journal.header.base_bags and not journal.base_done:
                self._base = open_reader(self.path)
            log.info("%s: resuming an unfinished write with %d committed bags", self.path, len(journal.ids))
            return journal
        if self.mode == "a" and exists:
            base = open_reader(self.path)
            checksum = requested["checksum"] if requested["checksum"] is not None else WriterConfig().checksum
            config = WriterConfig(
                dtype=str(base.dtype), compression=_base_compression(base), chunk_rows=requested["chunk_rows"],
                checksum=base.checksums is not None if len(base) else checksum,
                durable=requested["durable"],
            )
            self._check_same(base.info, config, info, requested, str(self.path))
            info, self._base = base.info, base if len(base) else None
            created = str(base.attrs.get("created") or utc_now())
        else:
            if info is None:
                raise BankError(f"{self.path}: an EncoderInfo is needed to create a bank")
            config = WriterConfig(**{k: v for k, v in requested.items() if v is not None})
            created = utc_now()
        check_compression(self.backend, config.compression, self.path)
        header = JournalHeader(
            backend=self.backend, info=info, config=config,
            chunk_rows=config.resolved_chunk_rows(self.backend, info.dim), created=created,
            base_bags=len(self._base) if self._base is not None else 0,
            checksum_algorithm=default_algorithm(),
        )
        return Journal.create(jdir, header)

    def _check_same(
        self, have_info: EncoderInfo, have: WriterConfig, info: EncoderInfo | None, req: dict[str, Any], where: str
    ) -> None:
        if info is not None:
            have_info.check_compatible(info, where=where)
            have_p, new_p = have_info.compute_dtype, info.compute_dtype
            if have_p != UNRECORDED and new_p != have_p:  # an unrecorded bank stays unrecorded
                raise BankError(
                    f"{where}: its features were computed in {have_p}, these in {new_p} (e.g. a bank started on "
                    "a GPU under bfloat16 autocast and resumed on a CPU); write them to another bank and join "
                    "the two with `milcore bank merge --accept-mixed-precision`, or re-extract with --overwrite"
                )
        for key in ("dtype", "compression"):
            want = req.get(key)
            if want is not None and WriterConfig(**{key: want}).__dict__[key] != getattr(have, key):
                raise BankError(
                    f"{where}: stores {key} {getattr(have, key)!r}; cannot append with {key} {want!r} "
                    "(use `milcore bank convert` to change it)"
                )

    # -- state -----------------------------------------------------------------------------------
    def has(self, bag_id: str) -> bool:
        """Whether ``bag_id`` is stored (finished bank or this unfinished write)."""
        return bag_id in self._journal.id_set or (self._base is not None and bag_id in self._base)

    __contains__ = has

    def stored_meta(self) -> dict[str, dict[str, Any]]:
        """Per-bag metadata of every stored bag (finished bank and this unfinished write), by bag id."""
        out: dict[str, dict[str, Any]] = {}
        base = self._base
        if base is not None:
            columns = base.bag_meta
            for i, bag_id in enumerate(base.bag_ids()):
                out[bag_id] = {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in columns.items()}
        out.update({b: dict(m) for b, m in zip(self._journal.ids, self._journal.metas, strict=True)})
        return out

    def __len__(self) -> int:
        base = len(self._base) if self._base is not None and not self._journal.base_done else 0
        return len(self._journal.ids) + base

    @property
    def num_instances(self) -> int:
        """Cells stored so far."""
        base = self._base.num_instances if self._base is not None and not self._journal.base_done else 0
        return self._journal.rows + base

    # -- appending -------------------------------------------------------------------------------
    def append(
        self,
        bag_id: str,
        features: Any,
        coords: Any = None,
        *,
        cell_id: Any = None,
        cell_type: Sequence[str] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Store one bag; it is durable against a crash once this returns.

        Args:
            bag_id: unique, non-empty id (patient folder, image stem or slide stem).
            features: ``(n, D)`` array (``n`` may be 0); converted to the bank's dtype.
            coords: ``(n, 2)`` pixel coordinates (rounded to int32), or ``None`` (stored as -1).
            cell_id: ``n`` ids (strings such as file stems, or integers; at most 48 UTF-8 bytes), or ``None``.
            cell_type: ``n`` cell-type names, or ``None``.
            meta: per-bag metadata, column -> bool/int/float/str.

        Raises:
            BankError: closed writer, duplicate id, wrong shape or dim, NaN/Inf, bad metadata.
        """
        if self._closed:
            raise BankError(f"{self.path}: writer is closed")
        where = f"{self.path}: bag {bag_id!r}"
        check_bag_id(bag_id, str(self.path))
        if self.has(bag_id):
            raise BankError(f"{where}: duplicate bag id (already stored)")
        x = np.asarray(features)
        if x.ndim == 1 and x.size == 0:
            x = x.reshape(0, self.info.dim)
        if x.ndim != 2 or x.shape[1] != self.info.dim:
            raise BankError(f"{where}: features have shape {x.shape}, expected (n, {self.info.dim})")
        if x.dtype.kind not in "fiu":
            raise BankError(f"{where}: features must be numeric, got {x.dtype}")
        with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
            x = np.ascontiguousarray(x, dtype=self.dtype)
        bad = count_nonfinite(x)
        if bad:
            raise BankError(f"{where}: {bad} NaN/Inf feature values (after conversion to {self.dtype})")
        crc: Any = None
        if self._crc is not None:  # while the rows are still in the CPU cache
            if self._hasher is not None and x.nbytes >= _ASYNC_HASH_BYTES:  # hash while the rows are written
                crc = self._hasher.submit(self._crc, x).result
            else:
                crc = self._crc(x)
        n = len(x)
        self._copy_base()  # first, so the existing bags keep their cell-type codes
        columns = {
            "coords": check_coords(coords, n, where),
            "cell_id": check_cell_ids(cell_id, n, where),
        }
        codes, new_types = self._cell_types(cell_type, n, where)
        columns["cell_type"] = codes
        clean = check_meta(meta, self._kinds, where)
        self._journal.append(bag_id, x, columns, clean, crc, new_types)
        self._note_kinds(clean)
        for name in new_types:
            self._type_codes[name] = len(self._type_codes)
        self._appended += 1

    def _note_kinds(self, meta: Mapping[str, Any]) -> None:
        for key, value in meta.items():
            kind = meta_kind(value) or "str"
            if key not in self._kinds or (self._kinds[key] == "int" and kind == "float"):
                self._kinds[key] = kind

    def _cell_types(self, cell_type: Sequence[str] | None, n: int, where: str) -> tuple[np.ndarray | None, list[str]]:
        if cell_type is None:
            return None, []
        names = [str(t) for t in np.asarray(cell_type, dtype=object).reshape(-1)]
        if len(names) != n:
            raise BankError(f"{where}: {len(names)} cell types for {n} cells")
        new = [t for t in dict.fromkeys(names) if t and t not in self._type_codes]
        if len(self._type_codes) + len(new) > np.iinfo(np.int16).max:
            raise BankError(f"{where}: too many distinct cell types (max {np.iinfo(np.int16).max})")
        lookup = {"": -1, **self._type_codes, **{t: len(self._type_codes) + i for i, t in enumerate(new)}}
        return np.array([lookup[t] for t in names], np.int16), new

    def _copy_base(self) -> None:
        """Before the first new bag of an append session, stage the existing bank's bags."""
        base = self._base
        if base is None or self._journal.base_done:
            return
        from feature_cache.progress import progress

        has = set(base.columns)
        meta = base.bag_meta
        for i, bag_id in enumerate(progress(base.bag_ids(), desc="staging existing bags", unit="bag")):
            x = base.read(bag_id)
            cols = {"coords": base.read_column(bag_id, "coords") if "coords" in has else None,
                    "cell_id": check_cell_ids(base.read_column(bag_id, "cell_id"), len(x), bag_id)
                    if "cell_id" in has else None}
            codes, new = self._cell_types(base.read_column(bag_id, "cell_type"), len(x), bag_id) \
                if "cell_type" in has else (None, [])
            cols["cell_type"] = codes
            row_meta = {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in meta.items()}
            crc = self._crc(x) if self._crc is not None else None
            self._journal.append(bag_id, x, cols, row_meta, crc, new)
            for name in new:
                self._type_codes[name] = len(self._type_codes)
        self._journal.mark_base_done()

    # -- closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the bank (one atomic rename) and release the lock; a no-op when already closed."""
        if self._closed:
            return
        try:
            j = self._journal
            new = len(j.ids) - (j.header.base_bags if j.base_done else 0)
            if new > 0 or self.mode == "w" or not self.path.exists():
                self._copy_base()
                finished = _finalize(j, self.path)
                j.mark_committed(finished)
                finish_commit(j, self.path)
                log.info("%s: wrote %d bags, %d cells", self.path, len(j.ids), j.rows)
            else:
                j.remove()
        finally:
            self._release()

    def abandon(self) -> None:
        """Release the lock but keep the unfinished write for a later ``mode='a'`` resume."""
        if not self._closed:
            log.warning(
                "%s: %d committed bags kept in %s; reopen with mode='a' to resume",
                self.path, len(self._journal.ids), self._journal.root,
            )
            self._journal.close_files()
            self._release()

    def discard(self) -> None:
        """Drop this session's unfinished write (the finished bank, if any, is untouched)."""
        if not self._closed:
            self._journal.remove()
            self._release()

    def _release(self) -> None:
        self._closed = True
        if self._hasher is not None:
            self._hasher.shutdown()
        if self._base is not None:
            self._base.close()
        self._lock.release()

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _base_compression(reader: BankReader) -> str | None:
    from feature_cache.bank.schema import FEATURES

    comp = reader._store().describe(FEATURES)["compression"]
    if comp is None:
        return None
    text = str(comp).lower()
    return "lzf" if "lzf" in text else "gzip" if "gzip" in text else "blosc-zstd"


def open_writer(
    path: str | Path,
    info: EncoderInfo | None = None,
    mode: str = "x",
    *,
    dtype: str | None = None,
    compression: str | None = None,
    chunk_rows: int = 0,
    checksum: bool | None = None,
    durable: bool = False,
) -> BankWriter:
    """Open a bank for writing (see the module docstring for modes).

    Args:
        path: ``.h5``/``.hdf5`` file or ``.zarr`` folder.
        info: encoder fingerprint (required unless resuming or appending in mode ``"a"``).
        mode: ``"x"`` create, ``"w"`` replace, ``"a"`` append or resume.
        dtype: ``"float16"`` (default for new banks) or ``"float32"``; appends keep the bank's.
        compression: ``None``/``"none"``, ``"lzf"`` (HDF5), ``"gzip"`` or ``"blosc-zstd"``.
        chunk_rows: rows per chunk where chunked (0 = sized for whole-bag reads).
        checksum: store a per-bag checksum of the feature bytes, checked by ``verify`` and on
            a bag's first whole-bag read (default: on for new banks where a hardware CRC-32C is
            available, see :class:`WriterConfig`; appends keep the bank's choice).
        durable: fsync every bag (power-loss safe); a killed process is safe without it.

    Raises:
        BankLockedError: another writer has the bank open.
        BankError: bad mode/suffix/settings, or (mode ``"x"``) the bank exists.
        EncoderMismatchError: ``info`` differs from the existing bank's fingerprint.
    """
    requested = {"dtype": dtype, "compression": compression, "chunk_rows": chunk_rows,
                 "checksum": checksum, "durable": durable}
    return BankWriter(path, info, mode, requested)
