"""Exemplar ranking and the memory: hand-checked scores, exact budgets, 64-bit indices past 255."""

from __future__ import annotations

import numpy as np
import pytest

from feature_cache.errors import InvalidArgumentError, UserError
from milcore.continual.exemplars import (
    MILReplayWeights,
    confidence_uncertainty_order,
    herding_order,
    milreplay_scores,
    minmax,
)
from milcore.continual.memory import ExemplarMemory, bag_quotas, group_budgets


def test_milreplay_scores_hand_checked():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    att = np.array([0.2, 0.3, 0.5])
    # attention mm: [0, 1/3, 1]; class distances [0, 1, 3] -> [0, 1/3, 1];
    # bag mean (4/3, 0): distances [4/3, 1/3, 5/3] -> [0.75, 0, 1]
    expected = 0.5 * np.array([0, 1 / 3, 1]) + 0.3 * np.array([0, 1 / 3, 1]) + 0.2 * np.array([0.75, 0, 1])
    np.testing.assert_allclose(milreplay_scores(x, att, np.zeros(2)), expected)
    only_bag = milreplay_scores(x, att, np.zeros(2), MILReplayWeights(0.0, 0.0, 1.0))
    np.testing.assert_allclose(only_bag, [0.75, 0.0, 1.0])
    assert np.argsort(-milreplay_scores(x, att, np.zeros(2)))[0] == 2


def test_minmax_and_negative_weight():
    np.testing.assert_array_equal(minmax(np.full(3, 2.0)), np.zeros(3))
    with pytest.raises(InvalidArgumentError, match="attention"):
        MILReplayWeights(attention=-1.0)


def test_herding_hand_checked():
    e = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # normalised mean ~ (0.569, 0.569): the diagonal bag first, then the tie goes to the first bag
    np.testing.assert_array_equal(herding_order(e), [2, 0, 1])
    assert len(herding_order(e, 2)) == 2


def test_confidence_uncertainty_interleaves():
    proba = np.array([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.99, 0.01]])
    # confidence in class 0: 3 > 0 > 2 > 1; entropy: 1 > 2 > 0 > 3
    np.testing.assert_array_equal(confidence_uncertainty_order(proba, np.zeros(4, dtype=int)), [3, 1, 0, 2])


def test_bag_quotas_exact_budget():
    np.testing.assert_array_equal(bag_quotas(10, [2, 5, 5], 4), [2, 4, 4])
    q = bag_quotas(100, [3, 50, 7, 90, 1], 8)
    assert q.sum() == 100 and np.all(q <= [3, 50, 7, 90, 1])
    np.testing.assert_array_equal(bag_quotas(100, [3, 4], 8), [3, 4])  # everything available
    np.testing.assert_array_equal(bag_quotas(5, [10, 10, 10, 10], 2), [2, 2, 1, 0])


def test_group_budgets_and_too_small_budget():
    assert group_budgets(10, 3) == [4, 3, 3]
    with pytest.raises(InvalidArgumentError, match="smaller than one instance per class"):
        group_budgets(2, 3)
    with pytest.raises(InvalidArgumentError):
        ExemplarMemory(budget=0)


def _cands(prefix: str, n_bags: int, size: int, start: int) -> list[tuple[str, np.ndarray]]:
    return [(f"{prefix}{b}", start + b * size + np.arange(size, dtype=np.int64)[::-1]) for b in range(n_bags)]


def test_memory_shrinks_to_budget_keeping_priority_prefixes():
    mem = ExemplarMemory(budget=60, per_bag=10)
    mem.update([(0, 0, _cands("a", 5, 20, 0)), (0, 1, _cands("b", 5, 20, 100))])
    assert mem.num_instances == 60 and mem.groups() == [(0, 0), (0, 1)]
    first = mem.entry_rows(0).copy()
    mem.update([(1, 2, _cands("c", 5, 20, 200))])
    assert mem.num_instances == 60
    assert [int((mem.labels == c).sum()) for c in range(3)] == [2, 2, 2]
    kept = mem.entry_rows(0)
    np.testing.assert_array_equal(kept, first[: len(kept)])  # the best rows stay
    assert mem.rows.dtype == np.int64 and mem.ptr.dtype == np.int64


def test_memory_indices_past_255_and_2_32_roundtrip(tmp_path):
    mem = ExemplarMemory(budget=900, per_bag=3)
    big = 5_000_000_000  # beyond 32-bit row indices
    cands = [(f"bag{b:04d}", big + 3 * b + np.arange(3, dtype=np.int64)) for b in range(300)]
    mem.update([(0, 0, cands)])
    assert len(mem) == 300 and mem.num_instances == 900
    path = mem.save(tmp_path / "memory.npz")
    back = ExemplarMemory.load(path)
    np.testing.assert_array_equal(back.rows, mem.rows)
    assert back.bag_ids == mem.bag_ids and int(back.rows.max()) == big + 899
    assert ExemplarMemory.from_state(mem.to_state()).rows.tolist() == mem.rows.tolist()
    (tmp_path / "bad.npz").write_bytes(b"not a memory")
    with pytest.raises(UserError, match="not an exemplar memory"):
        ExemplarMemory.load(tmp_path / "bad.npz")


def test_memory_rows_resolve_in_a_bank_past_255_bags(tmp_path):
    from feature_cache.bank import EncoderInfo, open_reader, open_writer
    from milcore.continual.data import BagData, Items

    info = EncoderInfo(name="toy", version="1", weights_sha256="", transform="none", dim=2)
    with open_writer(tmp_path / "bank.h5", info, mode="w") as w:
        for b in range(300):
            w.append(f"bag{b:04d}", np.stack([np.full(3, b), np.arange(3)], axis=1).astype(np.float32))
    bank = open_reader(tmp_path / "bank.h5")
    data = BagData(bank)
    mem = ExemplarMemory(budget=2, per_bag=2)
    mem.update([(0, 0, [("bag0299", data.global_rows("bag0299", np.array([2, 0])))])])
    assert mem.rows.tolist() == [899, 897]  # rows beyond 255, exact
    mem.validate(bank)
    items = Items(["bag0299"], np.zeros(1, dtype=np.int64), [mem.entry_rows(0)], np.ones(1, dtype=bool))
    np.testing.assert_array_equal(data.item_x(items, 0).numpy(), [[299, 2], [299, 0]])
    mem.bag_ids = ["bag9999"]
    with pytest.raises(UserError, match="missing from this bank: bag9999"):
        mem.validate(bank)
    mem.bag_ids, mem.rows = ["bag0001"], np.array([899, 897], dtype=np.int64)
    with pytest.raises(UserError, match="outside the bag"):
        mem.validate(bank)


def test_interleave_random_keeps_the_share_in_every_prefix():
    from milcore.continual.exemplars import interleave_random

    ranked = np.arange(40)[::-1]
    np.testing.assert_array_equal(interleave_random(ranked, 0.0, np.random.default_rng(0)), ranked)
    mixed = interleave_random(ranked, 0.5, np.random.default_rng(0))
    assert sorted(mixed.tolist()) == sorted(ranked.tolist())  # a permutation
    for t in range(0, 40, 2):  # every other pick is the best cell not taken yet
        assert mixed[t] == max(set(ranked.tolist()) - set(mixed[:t].tolist()))
