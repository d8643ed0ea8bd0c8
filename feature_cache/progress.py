"""Progress for long work: tqdm bars on a terminal, periodic log lines elsewhere, silence only when quiet.

Library code wraps iterables with :func:`progress` (or calls ``update()`` on the object it returns with
``total=``) and never prints. What the caller gets depends on where stderr goes:

* a terminal: a tqdm bar with rate and ETA;
* anything else (a file, a pipe, a batch scheduler's log): a plain object with the same ``update`` /
  ``close`` / ``set_postfix`` methods that writes one ``INFO`` record on the ``feature_cache.progress``
  logger at most every ``interval`` seconds (default 30, environment variable
  ``MILCORE_PROGRESS_INTERVAL``), e.g. ``extract toy: 120/480 bag (25%), 3.2 bag/s, ETA 0:01:52``;
* quiet (the command line's ``-q`` calls :func:`set_quiet`): nothing.

Lines are written when work advances (an ``update``), so a single unit longer than the interval shows
up when it finishes. :class:`WorkEstimate` announces the size of a job before it starts and, once the
first unit is measured, how long the whole should take.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Environment variable holding the seconds between two progress log lines.
INTERVAL_ENV = "MILCORE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar and progress log line of this process."""
    _state["quiet"] = bool(quiet)


def progress_mode() -> str:
    """``"bar"`` (stderr is a terminal), ``"log"`` (it is not) or ``"off"`` (quiet)."""
    if _state["quiet"]:
        return "off"
    return "bar" if sys.stderr.isatty() else "log"


def progress_enabled() -> bool:
    """Whether tqdm bars are shown: not quiet and stderr is a terminal."""
    return progress_mode() == "bar"


def progress_interval() -> float:
    """Seconds between two progress log lines: ``$MILCORE_PROGRESS_INTERVAL`` or 30.

    Raises:
        UserError: the variable is set to something other than a number >= 0.
    """
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
        if not math.isfinite(value) or value < 0:
            raise ValueError
    except ValueError:
        from feature_cache.errors import UserError

        raise UserError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds >= 0") from None
    return value


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


def _plural(unit: str) -> str:
    return unit if unit.endswith("s") else unit + "s"


class LogProgress:
    """The tqdm subset the library uses, writing a log line every ``interval`` seconds instead of a bar.

    Args:
        iterable: what to iterate (optional: ``update()`` by hand otherwise).
        total: number of units (for the percentage and ETA); ``len(iterable)`` when it has one.
        desc: what is being done, e.g. ``"extract toy"``.
        unit: name of one unit.
        interval: seconds between two lines (0: a line at every update).
        initial: units already done (a resumed job): counted in ``done`` but not in the rate.
        clock: time source (tests).
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", interval: float = DEFAULT_INTERVAL, initial: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.interval, self.n, self.disable = float(interval), int(initial), False
        self._initial, self._clock = int(initial), clock
        self._start = self._last = clock()
        self._postfix = ""
        self._closed = False
        self._logged = False
        self._last_n: float = self.n

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress object was made without an iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int | float = 1) -> None:
        """Count ``n`` more units done; log a line when ``interval`` seconds passed since the last one."""
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Extra ``key=value`` pairs appended to the next lines (e.g. the loss)."""
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """Change the label of the next lines."""
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw (tqdm compatibility)."""

    def close(self) -> None:
        """Log a last line if progress was logged and advanced since, or the work outlasted one interval."""
        if self._closed:
            return
        self._closed = True
        now = self._clock()
        advanced = self.n != self._last_n
        if (self._logged and advanced) or (not self._logged and advanced and now - self._start >= self.interval):
            self._emit(now, final=True)

    def line(self, now: float | None = None) -> str:
        """The current progress line: ``desc: done/total unit (pct%), rate unit/s, ETA H:MM:SS[, postfix]``."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._initial) / elapsed
        done = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        parts = [f"{self.desc}: {done} {self.unit}" if self.desc else f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 0.01 or rate == 0 else
                     f"{elapsed / max(self.n - self._initial, 1e-9):.3g} s/{self.unit}")  # fmt: skip
        if self.total:
            left = max(self.total - self.n, 0)
            parts.append(f"ETA {format_duration(left / rate) if rate > 0 else '?'}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self._postfix:
            parts.append(self._postfix)
        return ", ".join(parts)

    def _emit(self, now: float, final: bool = False) -> None:
        log.info("%s%s", self.line(now), " (done)" if final and self.total and self.n >= self.total else "")
        self._last, self._last_n, self._logged = now, self.n, True


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    interval: float | None = None,
    **kwargs: Any,
) -> Any:
    """Wrap ``iterable`` in a progress display: a tqdm bar on a terminal, log lines otherwise, nothing if quiet.

    Args:
        iterable: what to iterate; ``None`` returns an object to ``update()`` by hand.
        total: number of items (for the ETA) when ``len(iterable)`` is unknown.
        desc: label shown left of the bar (and at the start of each log line).
        unit: name of one item, e.g. ``"cells"``.
        interval: seconds between two log lines when stderr is not a terminal; ``None`` reads
            ``$MILCORE_PROGRESS_INTERVAL`` (default 30).
        **kwargs: passed to ``tqdm`` (``initial`` is honoured by the log lines too).

    Returns:
        A tqdm object (disabled and silent when quiet) or a :class:`LogProgress`; both iterate,
        ``update(n)``, ``set_postfix(...)`` and ``close()``.

    Raises:
        UserError: ``$MILCORE_PROGRESS_INTERVAL`` is not a number >= 0.
    """
    mode = progress_mode()
    if mode == "log":
        every = progress_interval() if interval is None else float(interval)
        return LogProgress(iterable, total=total, desc=desc, unit=unit, interval=every,
                           initial=int(kwargs.get("initial", 0) or 0))  # fmt: skip
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=mode == "off",
        dynamic_ncols=True,
        smoothing=0.1,
        **kwargs,
    )


class WorkEstimate:
    """Announce the size of a job before it starts, and its expected duration once one unit is measured.

    ``start()`` logs ``"<plan> = <total> <unit>s<detail>"``; the first ``done()`` logs how long that unit
    took and the time left for the others (assuming units of similar cost). Silent when quiet.

    Args:
        total: number of units (trainings, task trainings, ...).
        unit: name of one unit (singular).
        plan: how the total is made, e.g. ``"bench: 3 models x 5 folds x 3 seeds"``.
        detail: appended to the first line, e.g. ``" of up to 40 epochs on 120 bags"``.
        clock: time source (tests).
    """

    def __init__(self, total: int, unit: str, plan: str, detail: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.total, self.unit, self.plan, self.detail = int(total), unit, plan, detail
        self._clock, self._t0, self.finished = clock, None, 0
        self.first_seconds: float | None = None

    def start(self) -> None:
        """Log the size of the job and start the clock."""
        self._t0 = self._clock()
        if progress_mode() != "off":
            log.info("%s = %d %s%s", self.plan, self.total, self.unit if self.total == 1 else _plural(self.unit),
                     self.detail)  # fmt: skip

    def done(self, n: int = 1) -> None:
        """Count ``n`` finished units; after the first, log the estimated duration of the rest."""
        if self._t0 is None:
            self._t0 = self._clock()
        first = self.finished == 0
        self.finished += n
        if not first or self.finished <= 0:
            return
        took = self._clock() - self._t0
        self.first_seconds = took / n
        left = max(self.total - self.finished, 0)
        if progress_mode() != "off":
            log.info("first %s took %.1f s; about %s left for the other %d (%s in all)", self.unit, took,
                     format_duration(left * self.first_seconds), left,
                     format_duration(self.total * self.first_seconds))  # fmt: skip

    def skip(self, n: int = 1) -> None:
        """Units that need no work (already done by a resumed run): not timed, not counted as the first."""
        self.total = max(self.total - n, 0)
