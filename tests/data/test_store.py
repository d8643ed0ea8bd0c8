"""FeatureStore: a failed first read is not remembered as loaded (a retry loads the bags into memory again)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feature_cache.bank import open_reader
from feature_cache.errors import InvalidArgumentError
from milcore.data.store import FeatureStore


class _FlakyBank:
    """A bank whose first packed read fails (a damaged chunk, an I/O error), then works."""

    def __init__(self, reader) -> None:
        self.reader, self.failures, self.reads = reader, 1, 0

    def __getattr__(self, name: str):
        return getattr(self.reader, name)

    def read_packed(self, ids):
        self.reads += 1
        if self.failures:
            self.failures -= 1
            raise OSError("transient read error")
        return self.reader.read_packed(ids)


def test_failed_first_read_is_retried(planted_factory, tmp_path: Path) -> None:
    paths = planted_factory(tmp_path / "b", n_bags=6)
    with open_reader(paths["bank"]) as reader:
        bank = _FlakyBank(reader)
        store = FeatureStore(bank, reader.bag_ids())
        with pytest.raises(OSError, match="transient"):
            store.gather(np.arange(2))
        batch = store.gather(np.arange(2))  # (n, D) rows of bags 0 and 1
        expected = np.concatenate([reader.read(b) for b in reader.bag_ids()[:2]])
        np.testing.assert_array_equal(batch.x.numpy(), expected)
        store.gather(np.arange(3))
        assert bank.reads == 2, "after the retry the bags are held in memory, not read from the bank per batch"


def test_batches_in_the_compute_dtype_round_the_bank_values_once(planted_factory, tmp_path: Path) -> None:
    """``dtype=bfloat16`` gives exactly the float32 batch cast to bfloat16: in memory from a bfloat16 copy
    (room for it in the budget), in memory converting each batch (no room), and streaming."""
    import torch

    paths = planted_factory(tmp_path / "b", n_bags=6)
    with open_reader(paths["bank"]) as reader:
        order = np.arange(6)[::-1].copy()
        need = FeatureStore(reader, reader.bag_ids())._need
        for budget, copies in ((1 << 30, 1), (need, 0), (0, 0)):
            store = FeatureStore(reader, reader.bag_ids(), memory_budget_bytes=budget)
            ref = list(store.batches(order, 12, cap=5, seed=1))
            got = list(store.batches(order, 12, cap=5, seed=1, dtype=torch.bfloat16))
            assert len(ref) == len(got) > 1
            for a, b in zip(ref, got, strict=True):
                assert a.x.dtype == torch.float32 and b.x.dtype == torch.bfloat16
                assert torch.equal(a.x.to(torch.bfloat16), b.x) and torch.equal(a.ptr, b.ptr)
            assert len(store._resident.cast) == copies, budget
        with pytest.raises(InvalidArgumentError, match="floating dtype"):
            store.gather(np.arange(2), dtype=torch.int64)  # integer features would be truncated
