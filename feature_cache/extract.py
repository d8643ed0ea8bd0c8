"""Sources -> encoder -> bank: batched, prefetching, AMP on CUDA, resumable, sharded by rank.

DataLoader worker processes read and transform whole bags (decode, convert, resize to the encoder's
input) while the main process runs the encoder, so the encoder is never waiting on images. On CUDA
the crops travel as pinned uint8 tensors with non-blocking copies, the encoder runs channels-last
under bfloat16/float16 autocast in inference mode. Each bag is written atomically (the bank's
journal); bags already in the bank are skipped, so a rerun resumes where a killed run stopped.
``shard=(i, n)`` (or torchrun's ``RANK``/``WORLD_SIZE``) takes every n-th bag and writes its own
shard, to be joined with ``milcore bank merge``.

A run log ``<bank>.extract.jsonl`` records one line per bag (cells, failures, seconds) and one per
run (source, encoder, settings, totals).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction run.

    Attributes:
        source: ``crops``, ``fields``, ``slides`` or ``synthetic``.
        input: the source's path (folder, image folder, slide folder, synthetic cohort).
        encoder: registered encoder name.
        out: bank path (``.h5`` or ``.zarr``); with shards, each shard gets its own suffixed file.
        weights: local weights file for the encoder.
        cells: ``wbc`` or ``rbc`` for field and slide sources.
        batch_size: crops per forward pass (0: 256 on CUDA, 64 on CPU).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: bag-reading worker processes (-1: up to 4, fewer on small machines).
        shard: ``(index, count)``; ``None`` reads torchrun's RANK/WORLD_SIZE, else (0, 1).
        dtype: stored feature dtype.
        compression: bank compression.
        source_options: extra options for the source.
        encoder_options: extra options for the encoder (e.g. ``{"image_size": 96}``).
        overwrite: replace an existing bank (only once the new one is complete) instead of resuming it.
    """

    source: str
    input: str
    encoder: str
    out: str
    weights: str | None = None
    cells: str | None = None
    batch_size: int = 0
    device: str = "auto"
    num_workers: int = -1
    shard: tuple[int, int] | None = None
    dtype: str = "float16"
    compression: str | None = None
    source_options: dict[str, Any] = field(default_factory=dict)
    encoder_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False


@dataclass
class ExtractSummary:
    """What a run did.

    Attributes:
        bank: the bank (or shard) written.
        bags_written: bags encoded in this run.
        bags_skipped: bags already present (resume).
        cells: cells encoded in this run.
        failures: items the source skipped.
        seconds: wall time.
    """

    bank: Path
    bags_written: int
    bags_skipped: int
    cells: int
    failures: int
    seconds: float

    @property
    def cells_per_second(self) -> float:
        """End-to-end throughput."""
        return self.cells / self.seconds if self.seconds > 0 else 0.0


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """The shard to take: the given one, torchrun's rank / world size, or the whole set."""
    if shard is None:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        shard = (rank, world)
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise InvalidArgumentError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    return index, count


def shard_path(out: str | Path, index: int, count: int) -> Path:
    """``bank.h5`` -> ``bank.shard0of4.h5`` (unchanged for a single shard)."""
    out = Path(out)
    if count == 1:
        return out
    return out.with_name(f"{out.stem}.shard{index}of{count}{out.suffix}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``."""
    try:
        a, b = text.split("/")
        return resolve_shard((int(a), int(b)))
    except ValueError:
        raise InvalidArgumentError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None


class _BagItems:
    """Dataset of bags: each item is one bag read and transformed in a worker process."""

    def __init__(self, source, bag_ids: list[str], transform) -> None:
        self.source, self.bag_ids, self.transform = source, bag_ids, transform

    def __len__(self) -> int:
        return len(self.bag_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        bag = self.bag_ids[i]
        t0 = time.perf_counter()
        try:
            batch = self.source.read_bag(bag)
        except UserError as exc:  # a whole bag unreadable (e.g. a broken slide): record, never crash
            return {"bag": bag, "error": str(exc), "seconds": time.perf_counter() - t0}
        n = len(batch)
        size = self.transform.size
        pixels = torch.empty((n, 3, size, size), dtype=torch.uint8)
        for j in range(n):
            pixels[j] = self.transform(batch.pixels[j])
        return {"bag": bag, "pixels": pixels, "coords": batch.coords, "cell_ids": batch.cell_ids,
                "cell_types": batch.cell_types, "failures": [f.to_dict() for f in batch.failures],
                "seconds": time.perf_counter() - t0}  # fmt: skip


def _identity(item: Any) -> Any:
    return item


def _items(dataset: _BagItems, workers: int, pin: bool) -> Iterator[dict[str, Any]]:
    if workers == 0:
        for i in range(len(dataset)):
            yield dataset[i]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
                        collate_fn=_identity, prefetch_factor=2, persistent_workers=False)  # fmt: skip
    yield from loader


def _source_options(config: ExtractConfig) -> dict[str, Any]:
    opts = dict(config.source_options)
    if config.cells is not None:
        if config.source not in ("fields", "slides"):
            raise InvalidArgumentError(f"--cells applies to fields and slides sources, not {config.source!r}")
        opts["cells"] = config.cells
    return opts


def extract(config: ExtractConfig) -> ExtractSummary:
    """Run one extraction (see the module docstring).

    Raises:
        UserError: unreadable input, unknown source or encoder, weights problems, a bank built with
            another encoder (refused, never mixed), or a bank locked by another writer.
    """
    import torch

    from feature_cache.bank import open_writer
    from feature_cache.encoders import create_encoder
    from feature_cache.sources import create_source

    t_start = time.perf_counter()
    index, count = resolve_shard(config.shard)
    out = shard_path(config.out, index, count)
    source = create_source(config.source, config.input, **_source_options(config))
    all_bags = source.bag_ids()
    bags = all_bags[index::count]
    encoder = create_encoder(config.encoder, weights=config.weights, device=config.device, **config.encoder_options)
    cuda = encoder.device.type == "cuda"
    batch_size = config.batch_size or (256 if cuda else 64)
    workers = config.num_workers if config.num_workers >= 0 else min(4, max(0, (os.cpu_count() or 1) - 1))
    # "a": creates the bank, appends to it, or resumes an interrupted write; refuses another encoder.
    # "w": replaces the bank; the old one stays readable until the new one is complete.
    mode = "w" if config.overwrite else "a"
    writer = open_writer(out, encoder.info, mode=mode, dtype=config.dtype, compression=config.compression)
    log_path = out.with_name(out.name + ".extract.jsonl")
    todo = [b for b in bags if not writer.has(b)]
    skipped = len(bags) - len(todo)
    if skipped:
        log.info("%s: %d of %d bags already extracted, resuming with %d", out, skipped, len(bags), len(todo))
    written = cells = failures = 0
    try:
        with open(log_path, "a") as run_log:
            bar = progress(total=len(todo), desc=f"extract {config.encoder}", unit="bag")
            for item in _items(_BagItems(source, todo, encoder.transform), workers, cuda):
                bag = item["bag"]
                if "error" in item:
                    failures += 1
                    log.warning("skipped bag %s: %s", bag, item["error"])
                    run_log.write(json.dumps({"bag": bag, "error": item["error"]}) + "\n")
                    bar.update(1)
                    continue
                pixels = item["pixels"]
                n = len(pixels)
                feats = np.empty((n, encoder.dim), dtype=np.float32)
                for s in range(0, n, batch_size):
                    feats[s : s + batch_size] = encoder.forward_batch(pixels[s : s + batch_size]).numpy()
                types = item["cell_types"]
                writer.append(bag, feats, coords=item["coords"], cell_id=list(item["cell_ids"]),
                              cell_type=None if any(t is None for t in types) else list(types),
                              meta={"n_cells": n, "n_failures": len(item["failures"])})  # fmt: skip
                written += 1
                cells += n
                failures += len(item["failures"])
                run_log.write(json.dumps({"bag": bag, "cells": n, "failures": item["failures"],
                                          "read_seconds": round(item["seconds"], 4)}) + "\n")  # fmt: skip
                run_log.flush()  # one line per finished bag, readable while the run goes on
                bar.update(1)
                bar.set_postfix(cells_per_s=f"{cells / max(time.perf_counter() - t_start, 1e-9):.0f}")
            bar.close()
            writer.close()
            seconds = time.perf_counter() - t_start
            run_log.write(json.dumps({"run": {"source": source.describe(), "encoder": encoder.info.to_dict(),
                                              "config": {**asdict(config), "shard": [index, count]},
                                              "bags_written": written, "bags_skipped": skipped, "cells": cells,
                                              "failures": failures, "seconds": round(seconds, 3),
                                              "device": str(encoder.device), "batch_size": batch_size,
                                              "workers": workers}}, default=str) + "\n")  # fmt: skip
    except BaseException:
        writer.abandon()  # keeps every completed bag; a rerun resumes
        raise
    del torch
    summary = ExtractSummary(out, written, skipped, cells, failures, time.perf_counter() - t_start)
    log.info("%s: %d bags, %d cells in %.1f s (%.0f cells/s); %d skipped items; log %s", out, written, cells,
             summary.seconds, summary.cells_per_second, failures, log_path)  # fmt: skip
    if count > 1:
        shards = " ".join(str(shard_path(config.out, i, count)) for i in range(count))
        log.info("shard %d/%d done; join the shards with: milcore bank merge %s --out %s", index, count, shards,
                 config.out)  # fmt: skip
    return summary
