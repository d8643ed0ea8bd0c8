"""Extraction streams bags: what it holds does not grow with the number of bags (issue 14).

Memory itself (RSS with the real encoder and worker streaming, 8 vs 80 bags) is measured by
``benchmarks/bench_extract.py``; here the property behind it is checked exactly: after each bag is
written, at most a fixed number of bags' pixel tensors and feature arrays are still alive, whatever
the bag count. The same check run on an extractor that keeps every bag in a list fails.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest

import feature_cache.extract as fx
from feature_cache.bank import writer as bank_writer

#: Arrays alive after a bag is written: the current bag's pixels and features, one prefetched bag's pixels.
BOUND = 4


def _cohort(tmp_path: Path, bags: int) -> Path:
    config = tmp_path / f"cohort_{bags}.json"
    config.write_text(json.dumps({"task": "aml", "patients": bags, "seed": 0, "bag_median": 10, "bag_sigma": 0.0,
                                  "bag_range": [10, 10], "crop_size": 32}))  # fmt: skip
    return config


def _max_alive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bags: int, keep_every_bag: bool = False) -> int:
    """Extract ``bags`` bags with 2 worker processes; the most bag arrays alive after any bag was written."""
    refs: list[weakref.ref] = []
    most = [0]
    kept: list[dict] = []
    real_items, real_append = fx._items, bank_writer.BankWriter.append

    def items(*args, **kwargs):
        for item in real_items(*args, **kwargs):
            if "pixels" in item:
                refs.append(weakref.ref(item["pixels"]))
            if keep_every_bag:  # the bug this test must catch
                kept.append(item)
            yield item

    def append(self, bag_id, x, *args, **kwargs):
        refs.append(weakref.ref(x))
        out = real_append(self, bag_id, x, *args, **kwargs)
        most[0] = max(most[0], sum(r() is not None for r in refs))
        return out

    monkeypatch.setattr(fx, "_items", items)
    monkeypatch.setattr(bank_writer.BankWriter, "append", append)
    fx.extract(fx.ExtractConfig(source="synthetic", input=str(_cohort(tmp_path, bags)), encoder="toy",
                                out=str(tmp_path / f"bank_{bags}_{keep_every_bag}.h5"), num_workers=2))  # fmt: skip
    assert len(refs) == 2 * bags
    return most[0]


def _check(alive_small: int, alive_large: int) -> None:
    assert alive_large <= BOUND and alive_large <= alive_small + 1, (alive_small, alive_large)


def test_extraction_holds_a_bounded_number_of_bags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    small = _max_alive(monkeypatch, tmp_path, 4)
    large = _max_alive(monkeypatch, tmp_path, 40)  # 10x the bags
    _check(small, large)


def test_the_check_fails_when_the_extractor_keeps_every_bag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    small = _max_alive(monkeypatch, tmp_path, 4, keep_every_bag=True)
    large = _max_alive(monkeypatch, tmp_path, 40, keep_every_bag=True)
    assert large >= 40
    with pytest.raises(AssertionError):
        _check(small, large)


def test_freed_heap_memory_is_handed_back_at_most_once_per_period() -> None:
    """The extractor trims glibc's heaps (RSS drifted 0-49 MB over 80 bags without it; bench_extract.py)."""
    calls: list[int] = []
    release = fx._FreeMemory(period=3600.0)
    release._trim = calls.append  # a stand-in for malloc_trim
    for _ in range(5):
        release()
    assert calls == [0]
    every_time = fx._FreeMemory(period=0.0)
    every_time._trim = calls.append
    every_time()
    every_time()
    assert calls == [0, 0, 0]


def test_the_first_release_trims_even_soon_after_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """``time.monotonic`` may count from boot: on a machine up for 20 minutes the first call of an hour-period
    release still trims (it did not, when the last trim was taken to be at time 0)."""
    calls: list[int] = []
    monkeypatch.setattr(fx.time, "monotonic", lambda: 1200.0)
    release = fx._FreeMemory(period=3600.0)
    release._trim = calls.append
    release()
    release()
    assert calls == [0]


def test_extraction_offers_freed_memory_back_after_each_bag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = [0]
    monkeypatch.setattr(fx, "release_free_memory", lambda: calls.__setitem__(0, calls[0] + 1))
    fx.extract(fx.ExtractConfig(source="synthetic", input=str(_cohort(tmp_path, 3)), encoder="toy",
                                out=str(tmp_path / "bank.h5"), num_workers=0))  # fmt: skip
    assert calls[0] == 3
