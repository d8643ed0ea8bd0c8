"""``torchrun -m milcore extract``: 2 gloo processes write the single-process bank; resume and world-size changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_cache.bank import open_reader, open_writer
from feature_cache.bank.merge import copy_bags
from feature_cache.distributed import RankInfo, balanced_assignment, detect_rank, existing_shards
from feature_cache.errors import UserError
from feature_cache.extract import ExtractConfig, extract, shard_path
from feature_cache.sources.synthetic import SynthConfig, write_cohort

pytest.importorskip("torch.distributed")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "cohort"
    write_cohort(SynthConfig(task="aml", patients=8, seed=5, bag_median=12, bag_range=(4, 40)), out)
    return out


@pytest.fixture(scope="module")
def single(cohort: Path) -> Path:
    out = cohort.parent / "single.h5"
    extract(ExtractConfig(source="crops", input=str(cohort), encoder="toy", out=str(out), num_workers=0, shard=(0, 1)))
    return out


def _torchrun(cohort: Path, out: Path, n: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "milcore",
           "extract", "--source", "crops", "--input", str(cohort), "--encoder", "toy", "--out", str(out),
           "--workers", "0", "--device", "cpu"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _same_bank(a: Path, b: Path) -> None:
    with open_reader(a) as ra, open_reader(b) as rb:
        assert ra.bag_ids() == rb.bag_ids()  # same ids, same order
        assert ra.info.fingerprint() == rb.info.fingerprint() and ra.dtype == rb.dtype
        for bag in ra.bag_ids():
            assert ra.read(bag).tobytes() == rb.read(bag).tobytes(), bag
            assert list(ra.read_column(bag, "cell_id")) == list(rb.read_column(bag, "cell_id"))
            assert np.array_equal(ra.read_coords(bag), rb.read_coords(bag))


def test_balanced_assignment_is_deterministic_and_balanced() -> None:
    rng = np.random.default_rng(0)
    sizes = {f"b{i:03d}": int(s) for i, s in enumerate(rng.integers(10, 1000, size=200))}  # 100x spread
    ranks = balanced_assignment(sizes, 4)
    assert ranks == balanced_assignment(dict(reversed(list(sizes.items()))), 4) or all(
        sorted(a) == sorted(b) for a, b in zip(ranks, balanced_assignment(dict(reversed(list(sizes.items()))), 4),
                                               strict=True))  # fmt: skip
    assert sorted(b for r in ranks for b in r) == sorted(sizes)
    loads = [sum(sizes[b] for b in r) for r in ranks]
    assert max(loads) - min(loads) <= max(sizes.values())
    naive = [sum(sizes[b] for b in list(sizes)[r::4]) for r in range(4)]
    assert max(loads) - min(loads) < max(naive) - min(naive)
    assert all(r == sorted(r, key=list(sizes).index) for r in ranks), "each rank keeps the source order"


def test_rank_from_torchrun_environment() -> None:
    assert detect_rank({}) == RankInfo(0, 1, 0)
    assert detect_rank({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == RankInfo(3, 4, 1)
    with pytest.raises(UserError, match="outside WORLD_SIZE"):
        detect_rank({"RANK": "4", "WORLD_SIZE": "4"})


def test_two_gloo_ranks_write_the_single_process_bank(cohort: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "bank.h5"
    done = _torchrun(cohort, out)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_bank(single, out)
    assert not existing_shards(out), "shards are removed once merged"
    assert "rank 0: merged 2 shard(s)" in done.stderr


@pytest.mark.slow
def test_killed_rank_and_other_world_size_resume(cohort: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "bank.h5"
    bags = sorted(p.name for p in cohort.iterdir() if p.is_dir())
    cfg = ExtractConfig(source="crops", input=str(cohort), encoder="toy", out=str(out), num_workers=0)
    # an earlier 3-process run: one finished shard with two bags...
    extract(cfg.replace(shard=(0, 3)), bags=bags[:2])
    # ...and one whose rank was killed after committing a bag (an unfinished write, journal kept)
    extract(cfg.replace(shard=(1, 3)), bags=[bags[2]])
    with open_reader(single) as before:
        writer = open_writer(shard_path(out, 1, 3), mode="a")
        copy_bags(before, writer, [bags[3]])
        writer.abandon()  # killed: bag 3 committed to the journal, the bank not finished
    assert (out.parent / (shard_path(out, 1, 3).name + ".journal")).exists()
    with open_reader(single) as before:  # and rank 0 died while merging: an unfinished write of the bank itself
        writer = open_writer(out, before.info, mode="x")
        copy_bags(before, writer, [bags[0]])
        writer.abandon()
    done = _torchrun(cohort, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "earlier 3-process run" in done.stderr and "interrupted rank's shard" in done.stderr
    assert "interrupted merge found" in done.stderr
    _same_bank(single, out)
    assert not existing_shards(out)
    again = _torchrun(cohort, out)  # a finished bank: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_merge_refuses_shards_of_another_encoder_or_precision(tmp_path: Path) -> None:
    from dataclasses import replace

    from feature_cache.bank import EncoderInfo
    from feature_cache.bank.errors import BankError
    from feature_cache.distributed import merge_shards

    info = EncoderInfo(name="toy", version="1", weights_sha256="", transform="t", dim=4, compute_dtype="float32")
    others = {"b.h5": replace(info, name="other"), "c.h5": replace(info, compute_dtype="bfloat16")}
    with open_writer(tmp_path / "a.h5", info, mode="x") as w:
        w.append("p0", np.zeros((3, 4), np.float32))
    for name, other in others.items():
        with open_writer(tmp_path / name, other, mode="x") as w:
            w.append("p1", np.zeros((3, 4), np.float32))
        with pytest.raises(BankError, match=name):
            merge_shards([tmp_path / "a.h5", tmp_path / name], tmp_path / "out.h5", ["p0", "p1"])
        assert not (tmp_path / "out.h5").exists()


def test_unfinished_bank_without_shards_is_refused(cohort: Path, single: Path, tmp_path: Path) -> None:
    from feature_cache.distributed import extract_distributed

    out = tmp_path / "bank.h5"
    with open_reader(single) as before:
        writer = open_writer(out, before.info, mode="x")
        copy_bags(before, writer, [before.bag_ids()[0]])
        writer.abandon()
    cfg = ExtractConfig(source="crops", input=str(cohort), encoder="toy", out=str(out), num_workers=0, device="cpu")
    with pytest.raises(UserError, match="no shard beside it"):
        extract_distributed(cfg, RankInfo(0, 2))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_process_group_is_left_by_the_block_that_joined_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group left to interpreter shutdown aborted a torchrun worker in CI (exit -6 after its work was done):
    the block that joins the group destroys it, also on an error; a group the caller joined stays."""
    import torch.distributed as dist

    from feature_cache.distributed import backend_for, process_group

    assert [backend_for(d) for d in ("cpu", torch.device("cuda:1"), "cuda")] == ["gloo", "nccl", "nccl"]

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert not dist.is_initialized()
    with process_group("gloo") as group:
        assert group.is_initialized() and group.get_world_size() == 1
        group.barrier()
    assert not dist.is_initialized(), "destroyed at the end of the block"
    with pytest.raises(RuntimeError, match="inside"), process_group("gloo"):
        raise RuntimeError("inside")
    assert not dist.is_initialized(), "destroyed on an error too"
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend="gloo")
    try:
        with process_group("gloo"):
            pass
        assert dist.is_initialized(), "the caller's group is the caller's to leave"
    finally:
        dist.destroy_process_group()
