"""One writer at a time: an advisory lock file next to the bank (``<bank>.lock``).

The lock is an ``flock`` on the file, so the kernel releases it when the writer dies (even by
SIGKILL) and a stale file never blocks the next writer. Two writers in one process conflict too.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from feature_cache.bank.errors import BankLockedError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(bank: str | Path) -> Path:
    """Path of the lock file of ``bank``."""
    bank = Path(bank)
    return bank.with_name(bank.name + ".lock")


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another writer"
    except OSError:
        return "another writer"


class WriterLock:
    """Exclusive writer lock of one bank; ``acquire`` raises :class:`BankLockedError` if held."""

    def __init__(self, bank: str | Path) -> None:
        self.bank = Path(bank)
        self.path = lock_path(bank)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._lock_fd(fd)
            except BlockingIOError:
                os.close(fd)
                raise BankLockedError(
                    f"{self.bank}: already open for writing by {_holder(self.path)} (lock file {self.path})"
                ) from None
            try:  # the previous holder may have unlinked the file between our open and lock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    @staticmethod
    def _lock_fd(fd: int) -> None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif os.fstat(fd).st_size:  # pragma: no cover - best effort without flock
            raise BlockingIOError

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def is_locked(bank: str | Path) -> bool:
    """Whether a live writer holds ``bank``'s lock (a leftover lock file alone does not count)."""
    path = lock_path(bank)
    if fcntl is None or not path.exists():  # pragma: no cover - Windows
        return path.exists()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def writer_holder(bank: str | Path) -> str | None:
    """``"pid <n> on <host>"`` of the live writer holding ``bank``'s lock, or ``None`` when none does."""
    if not is_locked(bank):
        return None
    return _holder(lock_path(bank))
