"""Readers in DataLoader worker processes and in threads."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from feature_cache.bank import open_reader

torch = pytest.importorskip("torch")


class BagDataset(torch.utils.data.Dataset):
    """One item = a list of bag ids, returned packed as (x, ptr, crc of each bag)."""

    def __init__(self, reader, batches):
        self.reader, self.batches = reader, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        ids = self.batches[i]
        x, ptr = self.reader.read_packed(ids)
        crcs = [zlib.crc32(x[ptr[j] : ptr[j + 1]]) for j in range(len(ids))]
        return ids, torch.from_numpy(x), torch.from_numpy(ptr), crcs


@pytest.mark.parametrize(("suffix", "context"), [(".h5", "fork"), (".zarr", "fork"), (".h5", "spawn")])
def test_dataloader_workers_read_every_bag(tmp_path, info, suffix, context, make_bags, write_bank):
    bags = make_bags(40, seed=11)
    path = write_bank(tmp_path / f"bank{suffix}", bags, info)
    reader = open_reader(path)
    reader.read(bags[0].bag_id)  # the parent opens its handles before the workers fork
    expected = {b.bag_id: zlib.crc32(np.ascontiguousarray(b.features.astype(np.float16))) for b in bags}
    ids = [b.bag_id for b in bags][::-1]
    batches = [ids[i : i + 3] for i in range(0, len(ids), 3)]
    loader = torch.utils.data.DataLoader(
        BagDataset(reader, batches), batch_size=None, shuffle=True, num_workers=2,
        multiprocessing_context=context,
    )
    seen = {}
    for batch_ids, x, ptr, crcs in loader:
        assert x.shape == (int(ptr[-1]), info.dim)
        seen.update(zip(batch_ids, crcs, strict=True))
    assert seen == expected
    assert reader.read(bags[1].bag_id).shape == bags[1].features.shape  # the parent still reads
    reader.close()


def test_threads_share_one_reader(tmp_path, info, suffix, make_bags, write_bank):
    bags = make_bags(30, seed=12)
    path = write_bank(tmp_path / f"bank{suffix}", bags, info)
    expected = {b.bag_id: b.features.astype(np.float16) for b in bags}
    with open_reader(path) as reader:
        order = [b.bag_id for b in bags] * 8
        np.random.default_rng(0).shuffle(order)
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(lambda bag_id: (bag_id, reader.read(bag_id)), order))
        for bag_id, x in results:
            np.testing.assert_array_equal(x, expected[bag_id])
