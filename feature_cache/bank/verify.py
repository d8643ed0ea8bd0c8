"""``verify``: check a bank against the schema and its data, and report precisely what is wrong.

Checks, in order: the file opens (or a writer is still writing it); ``format``/``format_version``;
the encoder fingerprint; required datasets; feature shape against the fingerprint's ``dim`` and
dtype; that every array's data is stored in full (every Zarr chunk file present and of its
declared size, no HDF5 dataset past the end of the file); dtypes and attributes of the other
arrays; offsets (length B+1, start 0, never decreasing, ending at N); bag ids (non-empty, unique);
per-cell and per-bag column lengths; then, reading every chunk of every per-cell array, chunks that
are short or fail to decode, NaN/Inf feature values, cell-type codes outside their names, and the
stored per-bag checksums. An unfinished write (a journal left by a killed writer) is reported, and
:func:`recover_bank` finishes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.bank.checksum import checksum_function
from feature_cache.bank.errors import BankError
from feature_cache.bank.inputs import count_nonfinite
from feature_cache.bank.journal import journal_dir, pending_bags
from feature_cache.bank.layout import BankIndex, check_structure, located, open_store
from feature_cache.bank.lock import is_locked
from feature_cache.bank.reader import BankReader
from feature_cache.bank.schema import FEATURES, INSTANCE_COLUMNS

_LIST = 10  # bags named per kind of data problem
_GROUP_BYTES = 64 << 20


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_bank`; ``problems`` are one-line messages (empty when ``ok``)."""

    path: str
    problems: list[str] = field(default_factory=list)
    bags: int = 0
    instances: int = 0
    dim: int = 0
    dtype: str = ""
    checksums_checked: int = 0
    checksum_algorithm: str | None = None
    data_checked: bool = False
    unfinished_write: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with ``ok``)."""
        return {"ok": self.ok, **asdict(self)}


def verify_bank(path: str | Path, *, data: bool = True, checksums: bool = True) -> VerifyReport:
    """Verify ``path``; never raises for a broken bank (the problems are in the report).

    Args:
        path: the bank.
        data: read every chunk of every per-cell array (features, coords, ...) to find damaged
            chunks, NaN/Inf and bad cell-type codes, and compare checksums; ``False`` checks the
            structure and that every chunk file is present and of its declared size.
        checksums: compare each bag's stored checksum (when the bank has them).
    """
    path = Path(path)
    report = VerifyReport(str(path))
    jdir = journal_dir(path)
    if jdir.exists():
        report.unfinished_write = {
            "journal": str(jdir), "committed_bags": pending_bags(jdir), "writer_running": is_locked(path),
        }
    try:
        store = open_store(path)
    except BankError as exc:
        report.problems.append(str(exc))
        return report
    try:
        problems, index = check_structure(store, every_chunk=True)
    except BankError as exc:
        problems, index = [str(exc)], None
    finally:
        store.close()
    report.problems += [located(path, p) for p in problems]
    if index is None:
        return report
    report.bags, report.instances = len(index.ids), int(index.offsets[-1])
    report.dim, report.dtype = index.info.dim, str(index.dtype)
    report.checksum_algorithm = index.checksum_algorithm
    if data:
        try:
            with BankReader(path, checksums=False) as reader:
                _check_features(reader, index, report, checksums)
                _check_columns(reader, index, report)
        except BankError as exc:  # changed since the structure was checked
            report.problems.append(str(exc))
            return report
        report.data_checked = True
    return report


def _named(what: str, path: Path, bags: list[str]) -> str:
    more = f" and {len(bags) - _LIST} more" if len(bags) > _LIST else ""
    return f"{path}: {what} in {len(bags)} bags: {', '.join(bags[:_LIST])}{more}"


def _check_features(reader: BankReader, index: BankIndex, report: VerifyReport, checksums: bool) -> None:
    from feature_cache.progress import progress

    crc = None
    if checksums and index.checksums is not None:
        try:
            crc = checksum_function(str(index.checksum_algorithm), str(reader.path))
        except BankError as exc:
            report.problems.append(f"{exc} (checksums not checked)")
    offsets, ids = index.offsets, index.ids
    nonfinite: list[str] = []
    mismatched: list[str] = []
    unreadable: list[str] = []
    row_bytes = reader.dim * reader.dtype.itemsize
    bar = progress(total=len(ids), desc="verifying", unit="bag")
    start = 0
    while start < len(ids):  # groups of consecutive bags, read as one row range
        stop = start + 1
        while stop < len(ids) and (offsets[stop + 1] - offsets[start]) * row_bytes <= _GROUP_BYTES:
            stop += 1
        base = int(offsets[start])
        try:
            block = reader.read_rows(base, int(offsets[stop]))
        except BankError as exc:
            if str(exc) not in unreadable:
                unreadable.append(str(exc))
            bar.update(stop - start)
            start = stop
            continue
        for i in range(start, stop):
            x = block[offsets[i] - base : offsets[i + 1] - base]
            bad = count_nonfinite(x)
            if bad:
                nonfinite.append(f"{ids[i]!r} ({bad})")
            if crc is not None:
                got = crc(x)
                if got != int(index.checksums[i]):  # type: ignore[index]
                    mismatched.append(f"{ids[i]!r} (stored {int(index.checksums[i]):#010x}, read {got:#010x})")  # type: ignore[index]
        bar.update(stop - start)
        start = stop
    bar.close()
    report.problems += unreadable[:_LIST]
    if len(unreadable) > _LIST:
        report.problems.append(f"{reader.path}: {len(unreadable) - _LIST} more row ranges of '{FEATURES}' unreadable")
    report.checksums_checked = len(ids) if crc is not None and not unreadable else 0
    if nonfinite:
        report.problems.append(_named("NaN/Inf feature values", reader.path, nonfinite))
    if mismatched:
        what = f"{index.checksum_algorithm} checksum mismatch"
        report.problems.append(_named(what, reader.path, mismatched))


def _check_columns(reader: BankReader, index: BankIndex, report: VerifyReport) -> None:
    """Read every row of each per-cell column: damaged chunks and cell-type codes without a name."""
    N = int(index.offsets[-1])
    for name in index.columns:
        _, width, _ = INSTANCE_COLUMNS[name]
        step = max(1, _GROUP_BYTES // (width * 8))
        bad_codes = 0
        for a in range(0, N, step):
            try:
                rows = reader.read_rows(a, min(N, a + step), f"instances/{name}")
            except BankError as exc:
                report.problems.append(str(exc))
                break
            if name == "cell_type" and len(rows):
                bad_codes += int(np.count_nonzero((rows < -1) | (rows >= len(index.cell_type_names))))
        if bad_codes:
            report.problems.append(
                f"{reader.path}: 'instances/cell_type' has {bad_codes} codes outside its {len(index.cell_type_names)} "
                "named cell types"
            )


def recover_bank(path: str | Path) -> int:
    """Finish an unfinished write (keeping every committed bag); returns the bank's bag count.

    Raises:
        BankError: nothing to recover, or the writer is still running (lock held).
    """
    from feature_cache.bank.writer import open_writer

    path = Path(path)
    if not journal_dir(path).exists():
        raise BankError(f"{path}: no unfinished write to recover")
    writer = open_writer(path, mode="a")
    writer.close()
    with BankReader(path) as reader:
        return len(reader)
