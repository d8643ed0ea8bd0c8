"""Peak memory of a block of work: torch's allocator peak on CUDA, the resident high-water mark on Linux."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import torch

_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


class PeakMemory:
    """Context manager measuring the peak memory growth (MB) of the block it wraps.

    On CUDA devices it reads ``torch.cuda.max_memory_allocated`` (reset on entry); on Linux CPU it
    resets the process's resident high-water mark (``/proc/self/clear_refs``, after ``malloc_trim``) and
    reports ``VmHWM`` minus the resident size on entry. ``mb`` stays ``None`` where neither is available.

    Args:
        device: the device the work runs on.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mb: float | None = None
        self._before = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        if _LIBC is None:
            return self
        try:
            _LIBC.malloc_trim(0)
            self._before = _status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
        except OSError:
            self._before = -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = max(0.0, (torch.cuda.max_memory_allocated(self.device) - self._before) / 2**20)
        elif _LIBC is not None and self._before >= 0:
            try:
                self.mb = max(0.0, (_status_kb("VmHWM") - self._before) / 1024)
            except OSError:
                self.mb = None


def peak_memory_mb(fn: Callable[[], None], device: torch.device | str = "cpu") -> float | None:
    """Peak memory growth (MB) while ``fn`` runs; ``None`` where it cannot be measured."""
    with PeakMemory(device) as peak:
        fn()
    return peak.mb
