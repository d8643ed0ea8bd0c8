"""The write journal: how a bank is appended to crash-safely and resumed.

A writer never modifies a finished bank in place. It stages everything in ``<bank>.journal/``:

- ``header.json``: encoder fingerprint, writer settings, backend (written atomically first);
- the feature sink (see :mod:`feature_cache.bank.sinks`) and one raw file per per-cell column;
- ``commits.jsonl``: one line per bag, appended only **after** the bag's rows are written. A bag
  exists once its line is complete; recovery drops a torn last line and truncates the row files;
- ``BASE_DONE``: the rows of the existing bank (append mode) have all been copied in;
- ``COMMITTED``: the finished store is complete in the journal; only the final rename is left.

Killing the writer at any point therefore loses at most the bag in flight, and the previous bank
stays readable until an atomic rename replaces it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.bank.errors import BankError
from feature_cache.bank.schema import (
    FORMAT,
    FORMAT_VERSION,
    INSTANCE_COLUMNS,
    META_KINDS,
    EncoderInfo,
    WriterConfig,
    generated_by,
    meta_kind,
    utc_now,
)
from feature_cache.bank.sinks import HDF5_DATA_OFFSET, ChunkSink, ColumnFile, RawSink

JOURNAL_VERSION = 1


def journal_dir(bank: str | Path) -> Path:
    """Path of the journal directory of ``bank``."""
    bank = Path(bank)
    return bank.with_name(bank.name + ".journal")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pending_bags(root: Path) -> int:
    """Complete commit lines in a journal, read-only (for reports; recovery may keep fewer)."""
    log = Path(root) / "commits.jsonl"
    if not log.exists():
        return 0
    count = 0
    for line in log.read_bytes().split(b"\n")[:-1]:
        try:
            json.loads(line)
        except ValueError:
            break
        count += 1
    return count


@dataclass(frozen=True)
class JournalHeader:
    """What a journal needs to finish the bank without the writer's arguments."""

    backend: str
    info: EncoderInfo
    config: WriterConfig
    chunk_rows: int
    created: str
    base_bags: int = 0
    #: Algorithm of the per-bag checksums (journals of earlier versions hashed with zlib's CRC-32).
    checksum_algorithm: str = "crc32"

    @property
    def sink_kind(self) -> str:
        """``hdf5-inplace``, ``zarr-chunks`` or ``raw`` (compressed banks)."""
        if self.config.compression is not None:
            return "raw"
        return "hdf5-inplace" if self.backend == "hdf5" else "zarr-chunks"

    def to_json(self) -> str:
        """Serialize (with the journal version)."""
        body = {
            "journal_version": JOURNAL_VERSION,
            "backend": self.backend,
            "info": self.info.to_dict(),
            "config": asdict(self.config),
            "chunk_rows": self.chunk_rows,
            "created": self.created,
            "base_bags": self.base_bags,
            "checksum_algorithm": self.checksum_algorithm,
        }
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str, where: Path) -> JournalHeader:
        """Parse ``header.json``; raises :class:`BankError` naming ``where``."""
        try:
            body = json.loads(text)
            if body.get("journal_version") != JOURNAL_VERSION:
                raise ValueError(f"journal_version {body.get('journal_version')!r}")
            return cls(
                backend=body["backend"],
                info=EncoderInfo.from_dict(body["info"]),
                config=WriterConfig(**body["config"]),
                chunk_rows=int(body["chunk_rows"]),
                created=body["created"],
                base_bags=int(body.get("base_bags", 0)),
                checksum_algorithm=str(body.get("checksum_algorithm", "crc32")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BankError(f"{where}: unreadable journal header ({exc})") from None


class Journal:
    """Staged bags of one writer session; see the module docstring for the protocol."""

    def __init__(self, root: Path, header: JournalHeader) -> None:
        self.root, self.header = Path(root), header
        self.ids: list[str] = []
        self.sizes: list[int] = []
        self.crcs: list[int | None] = []
        self.metas: list[dict[str, Any]] = []
        self.cell_type_names: list[str] = []
        self.id_set: set[str] = set()
        self._rows = 0
        self.columns: dict[str, ColumnFile] = {}
        self.sink: RawSink | ChunkSink | None = None
        self._log = -1

    # -- creation and recovery -------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, header: JournalHeader) -> Journal:
        """Start an empty journal at ``root`` (which must not exist)."""
        root.mkdir()
        write_atomic(root / "header.json", header.to_json())
        journal = cls(root, header)
        journal._open_files(rows=0)
        return journal

    @classmethod
    def open(cls, root: Path) -> Journal:
        """Reopen a journal after a crash or an abandoned session, dropping any torn last bag."""
        header_path = root / "header.json"
        if not header_path.exists():
            raise BankError(f"{root}: journal without header.json (remove the folder to start over)")
        journal = cls(root, JournalHeader.from_json(header_path.read_text(), header_path))
        if not journal.committed_file:
            journal._replay()
        return journal

    def _replay(self) -> None:
        log = self.root / "commits.jsonl"
        data = log.read_bytes() if log.exists() else b""
        lines = data.split(b"\n")
        good = 0  # bytes of complete, parsed lines
        for i, line in enumerate(lines[:-1]):  # the last element follows the last newline
            try:
                entry = json.loads(line)
                self._remember(entry)
            except (ValueError, KeyError, TypeError):
                if i < len(lines) - 2:
                    raise BankError(f"{log}: commit line {i + 1} is corrupt") from None
                break
            good += len(line) + 1
        if good != len(data):
            with open(log, "r+b") as fh:
                fh.truncate(good)
        if self.header.base_bags and not self.base_done:  # base copy interrupted: copy again
            self._forget_all()
            with open(log, "r+b") as fh:
                fh.truncate(0)
        self._open_files(rows=self.rows)

    def _remember(self, entry: Mapping[str, Any]) -> None:
        bag_id, n = str(entry["id"]), int(entry["n"])
        self.ids.append(bag_id)
        self.id_set.add(bag_id)
        self.sizes.append(n)
        self._rows += n
        self.crcs.append(entry.get("crc"))
        self.metas.append(dict(entry.get("meta", {})))
        self.cell_type_names.extend(entry.get("types", []))

    def _forget_all(self) -> None:
        self.ids, self.sizes, self.crcs, self.metas, self.cell_type_names = [], [], [], [], []
        self.id_set, self._rows = set(), 0

    def _open_files(self, rows: int) -> None:
        h = self.header
        row_bytes = h.info.dim * np.dtype(h.config.dtype).itemsize
        kind = h.sink_kind
        if kind == "hdf5-inplace":
            self.sink = RawSink(self.root / "features.part", row_bytes, offset=HDF5_DATA_OFFSET, rows=rows)
        elif kind == "zarr-chunks":
            array_dir = self.root / "store.zarr" / "instances" / "features"
            self.sink = ChunkSink(array_dir, row_bytes, h.chunk_rows, rows=rows)
        else:
            self.sink = RawSink(self.root / "features.bin", row_bytes, rows=rows)
        for name, (dtype, width, _) in INSTANCE_COLUMNS.items():
            path = self.root / f"{name}.bin"
            if path.exists():
                self.columns[name] = ColumnFile(path, dtype, width, rows=rows)
        self._log = os.open(self.root / "commits.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # -- state -----------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Committed rows."""
        return self._rows

    @property
    def base_done(self) -> bool:
        """Whether the existing bank's bags have all been copied in (always true without a base)."""
        return not self.header.base_bags or (self.root / "BASE_DONE").exists()

    def mark_base_done(self) -> None:
        """Record that the base copy finished."""
        (self.root / "BASE_DONE").touch()

    @property
    def committed_file(self) -> Path | None:
        """The finished store inside the journal, once ``COMMITTED`` is written."""
        marker = self.root / "COMMITTED"
        return self.root / marker.read_text().strip() if marker.exists() else None

    def mark_committed(self, finished: Path) -> None:
        """Record that ``finished`` (inside the journal) is the complete new store."""
        self.close_files()
        write_atomic(self.root / "COMMITTED", finished.name)

    # -- appending -------------------------------------------------------------------------------
    def append(
        self,
        bag_id: str,
        features: np.ndarray,
        columns: Mapping[str, np.ndarray | None],
        meta: dict[str, Any],
        crc: int | Callable[[], int] | None,
        new_types: list[str],
    ) -> None:
        """Write one bag's rows, then its commit line (the bag exists once the line is complete).

        ``crc`` may be a callable (e.g. a future's ``result``), resolved after the rows are written
        so that hashing can overlap the writes.
        """
        n, start = len(features), self.rows
        assert self.sink is not None
        self.sink.append(features)
        for name, (dtype, width, missing) in INSTANCE_COLUMNS.items():
            values = columns.get(name)
            col = self.columns.get(name)
            if values is None and col is None:
                continue
            if col is None:  # first bag with this column: earlier rows get the missing value
                col = ColumnFile(self.root / f"{name}.bin", dtype, width)
                col.append(np.full((start, width), missing, dtype))
                self.columns[name] = col
            col.append(np.full((n, width), missing, dtype) if values is None else values)
        entry: dict[str, Any] = {"id": bag_id, "n": n}
        if callable(crc):
            crc = crc()
        if crc is not None:
            entry["crc"] = crc
        if meta:
            entry["meta"] = meta
        if new_types:
            entry["types"] = new_types
        if self.header.config.durable:
            self._sync_rows()
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        if os.write(self._log, line) != len(line):
            raise BankError(f"{self.root}: short write to the commit log (disk full?)")
        if self.header.config.durable:
            os.fsync(self._log)
        self._remember(entry)

    def _sync_rows(self) -> None:
        assert self.sink is not None
        self.sink.sync()
        for col in self.columns.values():
            col.sink.sync()

    def read_column(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows of a per-cell column, filled with its missing value where it was never given."""
        dtype, width, missing = INSTANCE_COLUMNS[name]
        col = self.columns.get(name)
        if col is None:
            shape = (stop - start, width) if width > 1 else (stop - start,)
            return np.full(shape, missing, dtype)
        return col.read(start, stop)

    def meta_columns(self) -> dict[str, tuple[str, np.ndarray]]:
        """Per-bag metadata as columns: name -> (kind, values ``(B,)``), missing values filled."""
        kinds: dict[str, str] = {}
        for meta in self.metas:
            for key, value in meta.items():
                kind = meta_kind(value)
                if key not in kinds or (kinds[key] == "int" and kind == "float"):
                    kinds[key] = kind or "str"
        out: dict[str, tuple[str, np.ndarray]] = {}
        for key, kind in kinds.items():
            dtype, missing = META_KINDS[kind]
            values = [meta.get(key, missing) for meta in self.metas]
            out[key] = (kind, np.array(values, dtype=object if kind == "str" else dtype))
        return out

    def root_attrs(self) -> dict[str, str]:
        """Root attributes of the finished bank (the encoder as a JSON string)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "encoder": json.dumps(self.header.info.to_dict(), sort_keys=True),
            "created": self.header.created,
            "modified": utc_now(),
            "generated_by": generated_by(),
        }

    def close_files(self) -> None:
        """Close every file handle (idempotent)."""
        if self.sink is not None:
            self.sink.close()
        for col in self.columns.values():
            col.sink.close()
        if self._log >= 0:
            os.close(self._log)
            self._log = -1

    def remove(self) -> None:
        """Close and delete the journal folder."""
        self.close_files()
        shutil.rmtree(self.root, ignore_errors=True)


def finish_commit(journal: Journal, bank: Path) -> None:
    """Move a committed journal's finished store into place, then delete the journal (idempotent)."""
    src = journal.committed_file
    assert src is not None
    if journal.header.backend == "zarr":
        old = journal.root / "old.zarr"
        if src.exists():
            if bank.exists() and not old.exists():
                os.rename(bank, old)
            os.rename(src, bank)
    elif src.exists():
        os.replace(src, bank)
    if journal.header.config.durable and hasattr(os, "O_DIRECTORY"):
        fd = os.open(bank.parent, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    journal.remove()
