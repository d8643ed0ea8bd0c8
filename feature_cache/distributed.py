"""Extraction across processes and machines on ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc-per-node N -m milcore extract ...`` (or ``--nnodes M --rdzv-endpoint HOST:PORT`` for
several machines) starts one process per rank with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set;
:func:`extract_distributed` then:

1. joins the process group (NCCL when the rank extracts on a GPU, gloo on CPU);
2. rank 0 finishes any unfinished shard of an earlier run *with another world size* (its committed
   bags are kept: :func:`~feature_cache.bank.verify.recover_bank`); barrier;
3. every rank computes the same assignment of the bags not yet extracted to ranks
   (:func:`balanced_assignment`: deterministic, balanced by cell count, no communication needed) and
   writes its own shard ``bank.shard{r}of{N}.h5`` through :func:`feature_cache.extract.extract`
   (resumable: a rank killed mid-run keeps every finished bag; the rerun resumes it);
4. barrier; rank 0 merges every shard (this run's and an earlier run's) into ``bank`` in the
   source's bag order (:func:`merge_shards`: streamed bag by bag, refusing shards of another encoder
   or precision), then deletes the shard banks (their run logs stay).

The merged bank equals the single-process bank: same bag ids in the same order, byte-equal features.
Everything is embarrassingly parallel except the two barriers and the merge on rank 0.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from feature_cache.errors import UserError

log = logging.getLogger(__name__)

#: Environment variables torchrun sets in every worker process.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun job.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of processes over every machine.
        local_rank: rank on this machine (picks the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that merges and writes shared files)."""
        return self.rank == 0


def detect_rank(env: Mapping[str, str] | None = None) -> RankInfo:
    """Rank, world size and local rank from torchrun's environment (a single process when absent).

    Raises:
        UserError: values that are not integers or a rank outside the world size.
    """
    env = os.environ if env is None else env
    try:
        info = RankInfo(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        shown = ", ".join(f"{k}={env.get(k)!r}" for k in TORCHRUN_VARS)
        raise UserError(f"torchrun environment: RANK, WORLD_SIZE and LOCAL_RANK must be integers ({shown})") from None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise UserError(f"torchrun environment: RANK={info.rank} is outside WORLD_SIZE={info.world_size}")
    return info


def balanced_assignment(weights: Mapping[str, int] | Sequence[tuple[str, int]], world_size: int) -> list[list[str]]:
    """Assign bags to ``world_size`` ranks so that each rank gets about the same number of cells.

    Longest-processing-time greedy: bags by decreasing weight (ties by id) each go to the rank with
    the fewest cells so far (ties: lowest rank); each rank's bags come back in the input order. The
    result depends only on the bags and weights, so every rank computes the same assignment. The
    largest rank load is at most 4/3 of the optimum (Graham's bound), and within one bag of the mean.

    Args:
        weights: bag id -> cell count (any non-negative size proxy), in the source's order.
        world_size: number of ranks.

    Returns:
        One list of bag ids per rank.
    """
    items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    position = {bag: i for i, (bag, _) in enumerate(items)}
    heap = [(0, r) for r in range(world_size)]  # (cells so far, rank)
    chosen: list[list[str]] = [[] for _ in range(world_size)]
    for bag, weight in sorted(items, key=lambda t: (-t[1], t[0])):
        load, rank = heapq.heappop(heap)
        chosen[rank].append(bag)
        heapq.heappush(heap, (load + max(int(weight), 0), rank))
    return [sorted(bags, key=position.__getitem__) for bags in chosen]


def bag_weights(source: Any, bag_ids: Sequence[str]) -> dict[str, int]:
    """Each bag's size as its source counts it (cells of a crop folder or synthetic patient, files of a
    field folder), 1 where the source does not count; the same on every rank for the same input."""
    out = {}
    for bag in bag_ids:
        items = source.origin(bag).items
        out[bag] = int(items) if items is not None and items >= 0 else 1
    return out


_SHARD = re.compile(r"^(?P<stem>.+)\.shard(?P<i>\d+)of(?P<n>\d+)(?P<suffix>\.[^.]+)$")


def existing_shards(out: str | Path) -> dict[int, list[Path]]:
    """Shard banks of ``out`` on disk (finished or not), by the world size that wrote them."""
    out = Path(out)
    found: dict[int, list[Path]] = {}
    if not out.parent.is_dir():
        return found
    for path in sorted(out.parent.iterdir()):
        m = _SHARD.match(path.name)
        if m and m["stem"] == out.stem and m["suffix"] == out.suffix:
            found.setdefault(int(m["n"]), []).append(path)
    return found


def merge_shards(shards: Sequence[str | Path], out: str | Path, order: Sequence[str],
                 *, accept_mixed_precision: bool = False) -> dict[str, Any]:  # fmt: skip
    """Merge ``shards`` into the new bank ``out`` with its bags in ``order`` (bags of no shard are skipped).

    Streamed: one bag in memory at a time, so peak memory does not grow with the bank. The output
    keeps the first shard's dtype, compression and checksum setting; it appears only once complete.

    Raises:
        BankError: shards of another encoder, of another compute precision (unless accepted), a bag
            in two shards, or ``out`` already there.
    """
    from feature_cache.bank import open_reader, open_writer
    from feature_cache.bank.errors import BankError
    from feature_cache.bank.merge import bag_meta_row

    readers = [open_reader(p) for p in shards]
    try:
        if not readers:
            raise BankError(f"{out}: nothing to merge (no shard)")
        first = readers[0]
        info = first.info
        for reader in readers[1:]:
            info.check_compatible(reader.info, where=str(reader.path))
        precisions = sorted({r.info.compute_dtype for r in readers})
        if len(precisions) > 1:
            if not accept_mixed_precision:
                odd = next(r for r in readers if r.info.compute_dtype != info.compute_dtype)
                raise BankError(f"{odd.path}: features computed in {odd.info.compute_dtype}, those of {first.path} in "
                                f"{info.compute_dtype}; shards of two precisions are not merged")  # fmt: skip
            info = replace(info, compute_dtype="mixed:" + "+".join(precisions))
        where: dict[str, Any] = {}
        for reader in readers:
            for bag in reader.bag_ids():
                if bag in where:
                    raise BankError(f"{reader.path}: bag {bag!r} is also in {where[bag].path}")
                where[bag] = reader
        from feature_cache.bank.writer import _base_compression

        writer = open_writer(out, info, "x", dtype=str(first.dtype), compression=_base_compression(first),
                             checksum=first.checksums is not None)  # fmt: skip
        try:
            n = 0
            for bag in order:
                reader = where.get(bag)
                if reader is None:
                    continue
                cols = reader.columns
                writer.append(bag, reader.read(bag), reader.read_coords(bag),
                              cell_id=reader.read_column(bag, "cell_id") if "cell_id" in cols else None,
                              cell_type=reader.read_column(bag, "cell_type") if "cell_type" in cols else None,
                              meta=bag_meta_row(reader, reader.bag_meta, reader.index_of(bag)))  # fmt: skip
                n += 1
            missing = set(where) - set(order)
            if missing:
                raise BankError(f"{where[min(missing)].path}: bag {min(missing)!r} is not among the input's bags "
                                f"({len(missing)} such bag(s)); the shards come from another input")  # fmt: skip
        except BaseException:
            writer.discard()
            raise
        writer.close()
    finally:
        for reader in readers:
            reader.close()
    return {"bags": n, "shards": [str(p) for p in shards], "output": str(out)}


def backend_for(device: Any) -> str:
    """The process-group backend for ranks computing on ``device``: NCCL for CUDA, gloo otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


@contextmanager
def process_group(backend: str, local_rank: int = 0) -> Iterator[Any]:
    """The default process group for the ``with`` block (NCCL ranks first take their machine's GPU).

    Joined unless the process is already in one, and then destroyed when the block ends (also on an
    error): a gloo or NCCL group left to interpreter shutdown can abort the process after its work is
    done ("terminate called without an active exception", exit -6) when its threads are torn down in the
    wrong order. A group joined by the caller is left to the caller.

    Yields:
        ``torch.distributed``.
    """
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group(backend=backend)
    try:
        yield dist
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def extract_distributed(config: Any, rank: RankInfo | None = None) -> Any:
    """One rank of a torchrun extraction (see the module docstring); returns this rank's summary.

    Args:
        config: the :class:`~feature_cache.extract.ExtractConfig` every rank was given (``shard`` unset).
        rank: this process's rank (default: from torchrun's environment).

    Raises:
        UserError: as :func:`~feature_cache.extract.extract`; a finished ``out`` that lacks bags of the
            input (extend it with a single-process run, or write a new ``--out``).
    """
    from feature_cache.bank import open_reader
    from feature_cache.bank.journal import journal_dir
    from feature_cache.devices import resolve_device
    from feature_cache.extract import _source_options, extract
    from feature_cache.sources import create_source

    rank = rank or detect_rank()
    out = Path(config.out)
    device = resolve_device(config.device, option="--device")
    if device.type == "cuda" and config.device in ("auto", "cuda"):
        device_name = f"cuda:{rank.local_rank}"  # one GPU per process on its machine
        config = replace(config, device=device_name)
    source = create_source(config.source, config.input, **_source_options(config))
    all_bags = source.bag_ids()
    if out.exists() and not journal_dir(out).exists() and not config.overwrite:
        with open_reader(out) as bank:
            lacking = [b for b in all_bags if b not in bank]
        if not lacking:
            log.info("%s: every bag of %s is already in the bank; nothing to do", out, config.input)
            return None  # every rank sees the same bank and returns here
        raise UserError(f"{out}: a finished bank without {len(lacking)} bag(s) of the input (e.g. {lacking[0]}); "
                        "a distributed run writes a new bank: use a new --out (or --overwrite), or extend this one "
                        "with a single-process 'milcore extract'")  # fmt: skip
    found = existing_shards(out)
    interrupted = journal_dir(out).exists()
    if interrupted and not found and not config.overwrite:
        raise UserError(f"{out}: an unfinished write with no shard beside it (not a distributed run's merge): "
                        f"finish it with 'milcore bank verify --recover {out}', or resume it with a "
                        "single-process 'milcore extract'")  # fmt: skip
    # every check that needs no other rank is done: join the others
    with process_group(backend_for(device), rank.local_rank) as dist:
        if interrupted and rank.main:  # a merge interrupted on rank 0: the shards are intact (deleted after a merge)
            log.warning("%s: an interrupted merge found; it is redone from the shards", out)
            shutil.rmtree(journal_dir(out))
        if config.overwrite:  # re-extract everything: earlier shards are not reused
            if rank.main:
                for path in (p for paths in found.values() for p in paths):
                    _remove_bank(path)
            found = {}
        elif rank.main:
            _finish_earlier_shards(found, rank.world_size, source, set(all_bags), config.accept_unrecorded)
        dist.barrier()  # every earlier shard is finished, checked against the input and readable from here on
        done: set[str] = set()
        for paths in found.values():
            for path in paths:
                with open_reader(path) as shard:
                    done.update(shard.bag_ids())
        todo = [b for b in all_bags if b not in done]
        mine = balanced_assignment(bag_weights(source, todo), rank.world_size)[rank.rank]
        log.info("rank %d/%d: %d of %d bags (balanced by cell count)", rank.rank, rank.world_size, len(mine), len(todo))
        summary = extract(replace(config, shard=(rank.rank, rank.world_size)), bags=mine) if mine else None
        dist.barrier()  # every shard finished
        if rank.main:
            shards = sorted({p for paths in existing_shards(out).values() for p in paths})
            target = out
            if config.overwrite and out.exists():
                target = out.with_name(f"{out.stem}.merging{out.suffix}")
                _remove_bank(target)  # left by an interrupted merge
            result = merge_shards(shards, target, all_bags)
            if target != out:
                _replace_bank(target, out)
            for path in shards:
                _remove_bank(path)
            log.info("rank 0: merged %d shard(s) into %s (%d bags); shard banks removed", len(shards), out,
                     result["bags"])  # fmt: skip
        dist.barrier()
    return summary


def _finish_earlier_shards(found: dict[int, list[Path]], world_size: int, source: Any, bags: set[str],
                           accept_unrecorded: bool) -> None:  # fmt: skip
    """Rank 0, before any rank writes: finish the shards an interrupted run left unfinished (keeping every
    committed bag) and check every stored bag's origin against the input read now.

    Raises:
        UserError: a stored bag recorded from another input (or unrecorded, unless accepted).
    """
    from feature_cache.bank import open_reader
    from feature_cache.bank.journal import journal_dir
    from feature_cache.bank.merge import bag_meta_row
    from feature_cache.bank.verify import recover_bank
    from feature_cache.sources.base import BagOrigin

    for n, paths in sorted(found.items()):
        if n != world_size:
            log.warning("%d shard(s) of an earlier %d-process run found (%s); this run has %d processes: their bags "
                        "are kept, not extracted again, and merged with this run's", len(paths), n, paths[0].name,
                        world_size)  # fmt: skip
        for path in paths:
            if journal_dir(path).exists():
                kept = recover_bank(path)
                log.warning("%s: an interrupted rank's shard, finished with its %d committed bag(s); the bags left "
                            "are shared out again", path, kept)  # fmt: skip
            with open_reader(path) as shard:
                meta = shard.bag_meta
                for i, bag in enumerate(shard.bag_ids()):
                    old = BagOrigin.from_meta(bag_meta_row(shard, meta, i))
                    if old is None:
                        if not accept_unrecorded:
                            raise UserError(f"{path}: bag {bag} was written without a record of its source; pass "
                                            "--accept-unrecorded to resume anyway, or --overwrite / a new --out")
                        continue
                    diff = old.difference(source.origin(bag)) if bag in bags else "not in the input"
                    if diff is not None:
                        raise UserError(f"{path}: bag {bag}: {diff}; use --overwrite to re-extract, or a new --out")


def _remove_bank(path: Path) -> None:
    """Delete a shard bank and any unfinished write of it."""
    from feature_cache.bank.journal import journal_dir

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    shutil.rmtree(journal_dir(path), ignore_errors=True)


def _replace_bank(new: Path, old: Path) -> None:
    if old.is_dir():
        _remove_bank(old)
    os.replace(new, old)
