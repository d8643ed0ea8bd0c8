"""``verify``: check a bank against the schema and its data, and report precisely what is wrong.

Checks, in order: the file opens; ``format``/``format_version``; the encoder fingerprint; required
datasets; feature shape against the fingerprint's ``dim`` and dtype; offsets (length B+1, start 0,
never decreasing, ending at N); bag ids (non-empty, unique); per-cell and per-bag column lengths;
then, reading every bag, NaN/Inf values and the stored per-bag CRC-32. An unfinished write (a
journal left by a killed writer) is reported, and :func:`recover_bank` finishes it.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from feature_cache.bank.errors import BankError
from feature_cache.bank.inputs import count_nonfinite
from feature_cache.bank.journal import journal_dir, pending_bags
from feature_cache.bank.layout import check_structure, open_store
from feature_cache.bank.lock import is_locked
from feature_cache.bank.reader import BankReader

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
        data: read every bag to look for NaN/Inf (and checksums); ``False`` checks structure only.
        checksums: compare each bag's stored CRC-32 (when the bank has them).
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
        problems, index = check_structure(store)
    finally:
        store.close()
    report.problems += [f"{path}: {p}" for p in problems]
    if index is None:
        return report
    report.bags, report.instances = len(index.ids), int(index.offsets[-1])
    report.dim, report.dtype = index.info.dim, str(index.dtype)
    if data:
        _check_data(BankReader(path), report, checksums)
    return report


def _check_data(reader: BankReader, report: VerifyReport, checksums: bool) -> None:
    from feature_cache.progress import progress

    stored = reader.checksums if checksums else None
    offsets, ids = reader.offsets(), reader.bag_ids()
    nonfinite: list[str] = []
    mismatched: list[str] = []
    row_bytes = reader.dim * reader.dtype.itemsize
    bar = progress(total=len(ids), desc="verifying", unit="bag")
    start = 0
    with reader:
        while start < len(ids):  # groups of consecutive bags, read as one row range
            stop = start + 1
            while stop < len(ids) and (offsets[stop + 1] - offsets[start]) * row_bytes <= _GROUP_BYTES:
                stop += 1
            base = int(offsets[start])
            block = reader.read_rows(base, int(offsets[stop]))
            for i in range(start, stop):
                x = block[offsets[i] - base : offsets[i + 1] - base]
                bad = count_nonfinite(x)
                if bad:
                    nonfinite.append(f"{ids[i]!r} ({bad})")
                if stored is not None:
                    crc = zlib.crc32(x)
                    if crc != int(stored[i]):
                        mismatched.append(f"{ids[i]!r} (stored {int(stored[i]):#010x}, read {crc:#010x})")
            bar.update(stop - start)
            start = stop
    bar.close()
    report.data_checked = True
    report.checksums_checked = len(ids) if stored is not None else 0
    for what, bags in (("NaN/Inf feature values", nonfinite), ("checksum mismatch", mismatched)):
        if bags:
            more = f" and {len(bags) - _LIST} more" if len(bags) > _LIST else ""
            report.problems.append(f"{reader.path}: {what} in {len(bags)} bags: {', '.join(bags[:_LIST])}{more}")


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
