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

Checked before anything is created: the device, the shard, the encoder's options (each by name,
type and range) and the source. Each bag is stored with where it came from
(:class:`~feature_cache.sources.base.BagOrigin`: source kind, path, file count, settings and a
fingerprint of its files' names, sizes and modification times, as per-bag metadata ``source_*``).
Resuming compares every bag already in the bank with the input read now and refuses a bag whose
origin differs, naming it: a bank is append-only (one bag cannot be replaced in place), and keeping
old features under a new input's name would be a wrong result, so refusing is the safe default;
``--overwrite`` re-extracts. Bags of banks written before origins were recorded cannot be checked:
resuming such a bank is refused unless ``accept_unrecorded`` (``--accept-unrecorded``) says to
trust them. A failure while reading a bag in a worker process ends the run with one line naming the
bag (the traceback goes to the debug log); a run that committed no bag leaves no write journal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.config import Config, option
from feature_cache.devices import resolve_device
from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig(Config):
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
        accept_unrecorded: resume a bank whose bags were written without a record of their source
            (before origins were recorded), trusting that they come from ``input``.
        stain_norm: ``reinhard`` or ``macenko``: normalise each bag's stain (fitted on all its crops)
            towards a target before encoding; recorded in the fingerprint's ``transform``, so banks
            normalised differently (or not at all) are never mixed, and a model trained on one is
            refused on another.
        stain_reference: crops (folder, CSV or ``.npz``) whose pooled colour statistics are the target
            (default: the built-in BloodMNIST target, :data:`feature_cache.encoders.stain.DEFAULT_TARGET`).
    """

    config_key = "extraction option"

    source: str
    input: str
    encoder: str
    out: str
    weights: str | None = None
    cells: str | None = None
    batch_size: int = option(0, low=0)
    device: str = "auto"
    num_workers: int = option(-1, low=-1)
    shard: tuple[int, int] | None = None
    dtype: str = "float16"
    compression: str | None = None
    source_options: dict[str, Any] = field(default_factory=dict)
    encoder_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    accept_unrecorded: bool = False
    stain_norm: str | None = None
    stain_reference: str | None = None


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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class _BagItems:
    """Dataset of bags: each item is one bag read and transformed in a worker process.

    Never raises (an exception in a worker would surface as a multi-line worker traceback): an
    unreadable bag becomes ``{"error": ...}`` (recorded, the run goes on); an input the run must
    stop on, or any unexpected failure, becomes ``{"fatal": ...}`` (the run ends naming the bag).
    """

    def __init__(self, source, bag_ids: list[str], transform, stain=None) -> None:
        self.source, self.bag_ids, self.transform, self.stain = source, bag_ids, transform, stain

    def __len__(self) -> int:
        return len(self.bag_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from feature_cache.sources.base import InputRefusedError

        bag = self.bag_ids[i]
        t0 = time.perf_counter()
        try:
            origin = self.source.origin(bag).to_meta()  # before reading: what the features will come from
            batch = self.source.read_bag(bag)
            n = len(batch)
            size = self.transform.size
            crops = self.stain(list(batch.pixels)) if self.stain is not None else batch.pixels  # one stain fit per bag
            pixels = torch.empty((n, 3, size, size), dtype=torch.uint8)
            for j in range(n):
                pixels[j] = self.transform(crops[j])
        except InputRefusedError as exc:  # an input the run must stop on (names the file)
            return {"bag": bag, "fatal": str(exc), "seconds": time.perf_counter() - t0}
        except UserError as exc:  # a whole bag unreadable (e.g. a broken slide): record, never crash
            return {"bag": bag, "error": str(exc), "seconds": time.perf_counter() - t0}
        except Exception as exc:  # anything else: one line naming the bag, the traceback for --debug
            return {"bag": bag, "fatal": f"bag {bag}: reading and transforming its cells failed ({_one_line(exc)})",
                    "traceback": traceback.format_exc(), "seconds": time.perf_counter() - t0}  # fmt: skip
        return {"bag": bag, "pixels": pixels, "coords": batch.coords, "cell_ids": batch.cell_ids,
                "cell_types": batch.cell_types, "failures": [f.to_dict() for f in batch.failures],
                "origin": origin, "seconds": time.perf_counter() - t0}  # fmt: skip


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
    it = iter(loader)
    done = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except RuntimeError as exc:  # a worker process died (killed for memory, crashed): name where
            bag = dataset.bag_ids[done] if done < len(dataset) else "?"
            raise UserError(
                f"a bag-reading worker process died while reading bag {bag} or one of the next {workers * 2} "
                f"({_one_line(exc)}); bags written so far are kept and a rerun resumes (--workers 0 reads in "
                "this process)"
            ) from None
        done += 1
        yield item


def check_origins(writer: Any, source: Any, bags: list[str], where: Path, accept_unrecorded: bool) -> None:
    """Refuse to resume when a stored bag's recorded origin differs from the input read now.

    Args:
        writer: the open bank writer.
        source: the source being extracted.
        bags: bags of this run already stored in the bank.
        where: the bank (for messages).
        accept_unrecorded: trust bags stored without an origin record instead of refusing.

    Raises:
        UserError: a bag's origin differs (the first one named, the others counted), or bags
            without a record and ``accept_unrecorded`` not set.
    """
    from feature_cache.sources.base import BagOrigin

    if not bags:
        return
    stored = writer.stored_meta()
    unrecorded: list[str] = []
    differ: list[tuple[str, str]] = []
    for bag in bags:
        old = BagOrigin.from_meta(stored.get(bag, {}))
        if old is None:
            unrecorded.append(bag)
            continue
        diff = old.difference(source.origin(bag))
        if diff is not None:
            differ.append((bag, diff))
    if differ:
        bag, diff = differ[0]
        more = ""
        if len(differ) > 1:
            names = ", ".join(b for b, _ in differ[1:4]) + (", ..." if len(differ) > 4 else "")
            more = f" ({len(differ) - 1} more bags differ: {names})"
        raise UserError(f"{where}: bag {bag}: {diff}{more}; use --overwrite to re-extract the bank, or a new --out")
    if unrecorded:
        what = (
            f"{where}: {len(unrecorded)} of the {len(bags)} bags already there (e.g. {unrecorded[0]}) were written "
            "without a record of their source (an older milcore), so they cannot be checked against the input"
        )
        if not accept_unrecorded:
            raise UserError(f"{what}; pass --accept-unrecorded to resume anyway, or --overwrite / a new --out")
        log.warning("%s; resuming as asked (--accept-unrecorded)", what)


def _source_options(config: ExtractConfig) -> dict[str, Any]:
    from feature_cache.sources import source_options

    opts = dict(config.source_options)
    if config.cells is not None:
        if "cells" not in source_options(config.source):  # what the source declares, not its name
            raise InvalidArgumentError(f"--cells applies to sources that detect cells (a 'cells' option), "
                                       f"not {config.source!r}")  # fmt: skip
        opts["cells"] = config.cells
    return opts


class _FreeMemory:
    """Hands memory the C allocator keeps after ``free`` back to the OS (glibc ``malloc_trim``).

    Without it the extracting process's RSS drifted up by 0-49 MB over 80 bags in repeated runs of
    ``benchmarks/bench_extract.py`` (no array outlived its bag: the freed pages stayed with glibc's
    heaps), enough to hide or fake a real leak. A trim costs about 10 ms, so it runs at most once per
    ``period`` seconds. A no-op where ``malloc_trim`` does not exist (macOS, musl, Windows).
    """

    def __init__(self, period: float = 1.0) -> None:
        self.period, self.last = period, -math.inf  # the first call trims (monotonic time may start near 0)
        self._trim: Any = ...  # looked up on the first call

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last < self.period:
            return
        self.last = now
        if self._trim is ...:
            try:
                import ctypes

                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None
        if self._trim is not None:
            self._trim(0)


release_free_memory = _FreeMemory()


def compute_info(encoder: Any, stain: Any = None) -> Any:
    """``encoder.info`` with ``compute_dtype`` set to the dtype ``encoder`` computes in (its autocast dtype).

    Stored in the bank, so shards computed in different precisions (GPU bfloat16, CPU float32) are not
    merged or resumed into one another silently. A stain normaliser's description is appended to the
    fingerprinted ``transform``.
    """
    info = replace(encoder.info, compute_dtype=str(encoder.dtype).removeprefix("torch."))
    if stain is not None:
        info = replace(info, transform=f"{info.transform};{stain.describe()}")
    return info


def make_stain_normalizer(method: str | None, reference: str | None) -> Any:
    """The per-bag stain normaliser of an extraction (``None`` when ``method`` is ``None``).

    Raises:
        InvalidArgumentError: an unknown method, or a reference without a method.
        UserError: an unreadable reference (naming the file).
    """
    if method is None:
        if reference is not None:
            raise InvalidArgumentError("--stain-reference needs --stain-norm reinhard or macenko")
        return None
    from feature_cache.encoders.stain import StainNormalizer, fit_target

    target = None
    if reference is not None:
        from feature_cache.encoders.celldata import read_cells

        target = fit_target(read_cells(reference, labelled=False).images)
    return StainNormalizer(method, target)


def extract(config: ExtractConfig, bags: list[str] | None = None) -> ExtractSummary:
    """Run one extraction (see the module docstring).

    Args:
        config: the run.
        bags: the bags of this shard (default: every ``count``-th bag of the source from ``index``);
            :func:`feature_cache.distributed.extract_distributed` passes a cell-count-balanced set.

    Raises:
        UserError: unreadable input, unknown source or encoder, a bad device or encoder option,
            weights problems, a bank built with another encoder (refused, never mixed), a stored
            bag recorded from another input (or unrecorded, see ``accept_unrecorded``), a refused
            input file (e.g. an oversized crop), a failure reading a bag, or a bank locked by
            another writer. Everything that can be checked up front is checked before any output
            (bank, journal, run log) is created.
    """
    import torch

    from feature_cache.bank import open_writer
    from feature_cache.bank.journal import journal_dir
    from feature_cache.encoders import check_encoder_options, create_encoder
    from feature_cache.sources import create_source

    t_start = time.perf_counter()
    index, count = resolve_shard(config.shard)
    out = shard_path(config.out, index, count)
    device = resolve_device(config.device, option="--device")
    encoder_options = check_encoder_options(config.encoder, config.encoder_options)
    stain = make_stain_normalizer(config.stain_norm, config.stain_reference)
    source = create_source(config.source, config.input, **_source_options(config))
    all_bags = source.bag_ids()
    assigned = bags is not None  # by a distributed run, whose rank 0 merges the shards itself
    bags = all_bags[index::count] if bags is None else list(bags)
    encoder = create_encoder(config.encoder, weights=config.weights, device=device, **encoder_options)
    cuda = encoder.device.type == "cuda"
    batch_size = config.batch_size or (256 if cuda else 64)
    workers = config.num_workers if config.num_workers >= 0 else min(4, max(0, (os.cpu_count() or 1) - 1))
    # "a": creates the bank, appends to it, or resumes an interrupted write; refuses another encoder.
    # "w": replaces the bank; the old one stays readable until the new one is complete.
    mode = "w" if config.overwrite else "a"
    fresh = not journal_dir(out).exists()  # no unfinished write of an earlier run to keep
    info = compute_info(encoder, stain)  # the fingerprint, the precision it computes in, the stain normalisation
    writer = open_writer(out, info, mode=mode, dtype=config.dtype, compression=config.compression)
    log_path = out.with_name(out.name + ".extract.jsonl")
    log_existed = log_path.exists()
    written = cells = failures = empty = 0
    nothing_found = False
    try:
        done = [b for b in bags if writer.has(b)]
        check_origins(writer, source, done, out, config.accept_unrecorded)
        todo = [b for b in bags if not writer.has(b)]
        skipped = len(done)
        if skipped:
            log.info("%s: %d of %d bags already extracted from this input, resuming with %d", out, skipped,
                     len(bags), len(todo))  # fmt: skip
        with open(log_path, "a") as run_log:
            bar = progress(total=len(todo), desc=f"extract {config.encoder}", unit="bag")
            for item in _items(_BagItems(source, todo, encoder.transform, stain), workers, cuda):
                bag = item["bag"]
                if "fatal" in item:
                    if "traceback" in item:
                        log.debug("worker traceback for bag %s:\n%s", bag, item["traceback"])
                    kept = f"{written} bag(s) of this run kept; a rerun resumes" if written else "nothing written"
                    raise UserError(f"{item['fatal']} ({kept})")
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
                              meta={"n_cells": n, "n_failures": len(item["failures"]), **item["origin"]})  # fmt: skip
                written += 1
                cells += n
                empty += n == 0
                failures += len(item["failures"])
                run_log.write(json.dumps({"bag": bag, "cells": n, "failures": item["failures"],
                                          "read_seconds": round(item["seconds"], 4)}) + "\n")  # fmt: skip
                run_log.flush()  # one line per finished bag, readable while the run goes on
                bar.update(1)
                bar.set_postfix(cells_per_s=f"{cells / max(time.perf_counter() - t_start, 1e-9):.0f}")
                release_free_memory()
            bar.close()
            if todo and not cells and not skipped:  # every bag unreadable or empty: a bank of nothing
                nothing_found = True
                raise UserError(f"{config.input}: none of the {len(todo)} bag(s) gave a cell ({empty} with no cell "
                                f"found, {failures} unreadable item(s); each is named in {log_path}); no bank "
                                "written: check the input folder and, for fields and slides, --cells")  # fmt: skip
            writer.close()
            seconds = time.perf_counter() - t_start
            run_log.write(json.dumps({"run": {"source": source.describe(), "encoder": info.to_dict(),
                                              "config": {**asdict(config), "shard": [index, count]},
                                              "bags_written": written, "bags_skipped": skipped, "cells": cells,
                                              "failures": failures, "seconds": round(seconds, 3),
                                              "device": str(encoder.device), "batch_size": batch_size,
                                              "workers": workers}}, default=str) + "\n")  # fmt: skip
    except BaseException:
        if (written == 0 or nothing_found) and fresh:
            writer.discard()  # nothing staged worth keeping: leave no journal to block or confuse the rerun
            if not log_existed and log_path.exists() and log_path.stat().st_size == 0:
                log_path.unlink()
        else:
            writer.abandon()  # keeps every completed bag; a rerun resumes
        raise
    del torch
    summary = ExtractSummary(out, written, skipped, cells, failures, time.perf_counter() - t_start)
    log.info("%s: %d bags, %d cells in %.1f s (%.0f cells/s); log %s", out, written, cells, summary.seconds,
             summary.cells_per_second, log_path)  # fmt: skip
    if empty:
        log.warning("%s: %d bag(s) have NO cell (nothing detected or every image unreadable); they are stored "
                    "empty, and training and prediction leave them out; each is named in %s", out, empty, log_path)
    if failures:
        log.warning("%s: %d unreadable items (images, regions or bags) were SKIPPED, not encoded; each is named in %s",
                    out, failures, log_path)  # fmt: skip
    if count > 1 and not assigned:
        shards = " ".join(str(shard_path(config.out, i, count)) for i in range(count))
        log.info("shard %d/%d done; join the shards with: milcore bank merge %s --out %s", index, count, shards,
                 config.out)  # fmt: skip
    return summary
