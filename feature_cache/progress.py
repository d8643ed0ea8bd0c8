"""Progress bars for long work: tqdm with rate and ETA, silent when not a TTY or when quiet.

The command line calls :func:`set_quiet` for ``-q``; library code wraps iterables with
:func:`progress` and never prints.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar of this process."""
    _state["quiet"] = bool(quiet)


def progress_enabled() -> bool:
    """Whether bars are shown: not quiet and stderr is a terminal."""
    return not _state["quiet"] and sys.stderr.isatty()


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    **kwargs: Any,
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar (rate + ETA) when bars are enabled.

    Args:
        iterable: what to iterate; ``None`` returns a bar to ``update()`` by hand.
        total: number of items (for the ETA) when ``len(iterable)`` is unknown.
        desc: label shown left of the bar.
        unit: name of one item, e.g. ``"cells"``.
        **kwargs: passed to ``tqdm``.

    Returns:
        A tqdm object (disabled and silent when bars are off).
    """
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(),
        dynamic_ncols=True,
        smoothing=0.1,
        **kwargs,
    )
