"""Benchmark: feature-bank I/O against a raw numpy memmap CSR store measured in the same run.

Per feature width and layout: write time and throughput, size on disk, random-order whole-bag
reads (bags/s, MB/s, warm page cache) in one process, through a DataLoader with 0 and 2 workers (one
bag per item) and through the training pipeline (2 workers, 8 bags per batch packed into ``x (N, D)``
+ ``ptr`` in the workers), and the reader's resident-memory growth after reading every bag. Ratios
compare best-of-N figures of repetitions that alternate each layout with the memmap CSR limit.

Layouts: ``memmap`` (the limit); HDF5 banks ``hdf5`` (the defaults: contiguous, pread, per-bag
checksums written and checked on whole-bag reads), ``hdf5-nocheck`` (same file, reads skip the
checksums), ``hdf5-nocrc`` (written without checksums), ``hdf5-mmap``, ``hdf5-h5py``,
``hdf5-lzf``/``-gzip``/``-blosc-zstd``; Zarr banks ``zarr`` (direct chunk reads), ``zarr-nocheck``,
``zarr-nocrc``, ``zarr-python``, ``zarr-blosc-zstd``; peers ``clam-h5`` (a .h5 per slide, one-row
chunks, as CLAM/TRIDENT write), ``h5-per-bag``, ``npy-per-bag`` (torchmil), ``h5py-chunked`` (1,024-row
chunks).

Checksum cost (``checksums.json``; ``--checksums-only`` runs just this): per backend, write throughput
without checksums, with CRC-32C (hardware ``google-crc32c``, the default) and with zlib's CRC-32,
rotating the three in each of ``--repeats`` rounds; the ratio unchecked / checked write time (median
over rounds; the ratio of best times too) against the 0.9 floor that decides whether checksums are
on by default; and random whole-bag reads of the checksummed
bank: without the check and with it, on a fresh reader's first pass (the checking reader checks each
bag then), and on later passes (steady state: a checking and an unchecked reader, both past their
first pass, alternating).

Usage:
    python benchmarks/bench_bank_io.py [--bags 2000] [--median 300] [--dims 512,1280] [--out DIR] [--quick]
    python benchmarks/bench_bank_io.py --checksums-only [--bags 2000] [--dims 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_bank_io")
AUTO, NOCHECK = {"io": "auto"}, {"io": "auto", "checksums": False}
BANK = {  # layout -> (writer settings, reader options, layout whose files it reads)
    "hdf5": ({"suffix": ".h5"}, AUTO, None), "hdf5-nocheck": (None, NOCHECK, "hdf5"),
    "hdf5-nocrc": ({"suffix": ".h5", "checksum": False}, AUTO, None),
    "hdf5-mmap": (None, {"io": "mmap"}, "hdf5"), "hdf5-h5py": (None, {"io": "library"}, "hdf5"),
    **{f"hdf5-{c}": ({"suffix": ".h5", "compression": c}, AUTO, None) for c in ("lzf", "gzip", "blosc-zstd")},
    "zarr": ({"suffix": ".zarr"}, AUTO, None), "zarr-nocheck": (None, NOCHECK, "zarr"),
    "zarr-nocrc": ({"suffix": ".zarr", "checksum": False}, AUTO, None),
    "zarr-python": (None, {"io": "library"}, "zarr"),
    "zarr-blosc-zstd": ({"suffix": ".zarr", "compression": "blosc-zstd"}, AUTO, None),
}
#: Checksummed writes must keep this fraction of the unchecked write throughput to be on by default.
CHECKSUM_FLOOR = 0.9
PEERS = ("clam-h5", "h5-per-bag", "npy-per-bag", "h5py-chunked")
DEFAULT_LAYOUTS = {512: ("memmap", *BANK, *PEERS),
                   1280: ("memmap", "hdf5", "hdf5-mmap", "hdf5-blosc-zstd", "zarr", "zarr-blosc-zstd", "clam-h5")}
SLOW = {*PEERS, "hdf5-lzf", "hdf5-gzip", "hdf5-blosc-zstd", "zarr-blosc-zstd", "zarr-python", "hdf5-h5py"}


class Data:
    """The synthetic bank content: heavy-tailed bag sizes (log-normal), |N(0,1)| float16 features."""

    def __init__(self, bags: int, median: int, dim: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        sizes = np.clip(np.rint(rng.lognormal(np.log(median), 0.8, bags)), 1, 50 * median).astype(np.int64)
        sizes[rng.choice(bags, max(1, bags // 200), replace=False)] = 0  # a few empty bags
        self.ptr = np.concatenate([[0], np.cumsum(sizes)])
        self.ids = [f"patient_{i:05d}" for i in range(bags)]
        self.x = np.empty((int(self.ptr[-1]), dim), np.float16)  # (N, D)
        for a in range(0, len(self.x), 65536):
            self.x[a : a + 65536] = np.abs(rng.standard_normal((min(65536, len(self.x) - a), dim), np.float32))
        self.coords = rng.integers(0, 100_000, (len(self.x), 2)).astype(np.int32)
        self.order = rng.permutation(bags)
        self.sizes = dict(zip(self.ids, sizes.tolist(), strict=True))

    def bag(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[self.ptr[i] : self.ptr[i + 1]], self.coords[self.ptr[i] : self.ptr[i + 1]]


# -- layouts: writers return the reader (picklable, with read / read_packed) ----------------------
class MemmapCSR:
    """The limit: features, coords and offsets as .npy files, read through numpy memmaps."""

    def __init__(self, root: Path) -> None:
        self.root, self.ptr, self._mm = root, np.load(root / "ptr.npy"), None
        self.pos = {b: i for i, b in enumerate(json.loads((root / "ids.json").read_text()))}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mm": None}

    def _x(self) -> np.ndarray:
        self._mm = np.load(self.root / "x.npy", mmap_mode="r") if self._mm is None else self._mm
        return self._mm

    def read(self, bag_id: str) -> np.ndarray:
        i = self.pos[bag_id]
        return np.array(self._x()[self.ptr[i] : self.ptr[i + 1]])

    def read_packed(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        x, rows = self._x(), [(self.ptr[self.pos[b]], self.ptr[self.pos[b] + 1]) for b in ids]
        ptr = np.concatenate([[0], np.cumsum([b - a for a, b in rows])])
        out = np.empty((int(ptr[-1]), x.shape[1]), x.dtype)
        for j, (a, b) in enumerate(rows):
            out[ptr[j] : ptr[j + 1]] = x[a:b]
        return out, ptr


class Peer:
    """Peer layouts: one file per bag opened per read (CLAM/TRIDENT .h5, contiguous .h5, torchmil .npy),
    or one appendable chunked HDF5 dataset sliced by h5py (``kind="chunked"``)."""

    def __init__(self, root: Path, kind: str, ptr: np.ndarray | None = None, ids: list[str] | None = None) -> None:
        self.root, self.kind, self.ptr, self._f = root, kind, ptr, None
        self.pos = {b: i for i, b in enumerate(ids or [])}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_f": None}

    def read(self, bag_id: str) -> np.ndarray:
        import h5py

        if self.kind == "npy":
            return np.load(self.root / f"{bag_id}.npy")
        if self.kind == "h5":
            with h5py.File(self.root / f"{bag_id}.h5", "r") as f:
                return f["features"][:]
        self._f = self._f or h5py.File(self.root / "chunked.h5", "r")
        i = self.pos[bag_id]
        return self._f["features"][self.ptr[i] : self.ptr[i + 1]]

    def read_packed(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return _concat([self.read(b) for b in ids])


def _concat(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate(parts), np.concatenate([[0], np.cumsum([len(p) for p in parts])])


def write_layout(name: str, data: Data, root: Path):
    """Write ``data`` as layout ``name`` under ``root``; returns a reader."""
    import h5py

    from feature_cache.bank import EncoderInfo, open_reader, open_writer

    root.mkdir(parents=True)
    B = len(data.ids)
    if name == "memmap":
        x = np.lib.format.open_memmap(root / "x.npy", "w+", np.float16, data.x.shape)
        c = np.lib.format.open_memmap(root / "coords.npy", "w+", np.int32, data.coords.shape)
        for i in range(B):
            a, b = data.ptr[i], data.ptr[i + 1]
            x[a:b], c[a:b] = data.bag(i)
        del x, c  # unmapped; dirty pages stay in the page cache as for every other layout
        np.save(root / "ptr.npy", data.ptr)
        (root / "ids.json").write_text(json.dumps(data.ids))
        return MemmapCSR(root)
    if name in BANK:
        settings = dict(BANK[name][0])
        path = root / f"bank{settings.pop('suffix')}"
        info = EncoderInfo("bench", "1", "", "none", data.x.shape[1])
        with open_writer(path, info, "w", **settings) as w:
            for i in range(B):
                w.append(data.ids[i], *data.bag(i))
        return open_reader(path, **BANK[name][1])
    if name == "h5py-chunked":
        with h5py.File(root / "chunked.h5", "w") as f:
            d = data.x.shape[1]
            x = f.create_dataset("features", (0, d), maxshape=(None, d), chunks=(1024, d), dtype=np.float16)
            c = f.create_dataset("coords", (0, 2), maxshape=(None, 2), chunks=(1024, 2), dtype=np.int32)
            for i in range(B):
                a, b = data.ptr[i], data.ptr[i + 1]
                x.resize(b, axis=0), c.resize(b, axis=0)
                x[a:b], c[a:b] = data.bag(i)
        return Peer(root, "chunked", data.ptr, data.ids)
    for i in range(B):
        x, c = data.bag(i)
        if name == "npy-per-bag":
            np.save(root / f"{data.ids[i]}.npy", x)
            continue
        with h5py.File(root / f"{data.ids[i]}.h5", "w") as f:
            if name == "clam-h5":  # CLAM's save_hdf5: unlimited first axis, one-row chunks
                for key, v in (("features", x), ("coords", c.astype(np.int64))):
                    f.create_dataset(key, shape=v.shape, maxshape=(None, v.shape[1]), chunks=(1, v.shape[1]),
                                     dtype=v.dtype)[:] = v
            else:
                f["features"], f["coords"] = x, c
    return Peer(root, "npy" if name == "npy-per-bag" else "h5")


# -- measurements ---------------------------------------------------------------------------------
def disk_bytes(root: Path) -> int:
    """Bytes allocated on disk under ``root``."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def warm(root: Path) -> None:
    """Read every file once so the page cache is warm."""
    for p in (p for p in root.rglob("*") if p.is_file()):
        with open(p, "rb") as fh:
            while fh.read(16 << 20):
                pass


def rss() -> dict[str, float]:
    """RssAnon and RssFile of this process in MB (Linux; empty elsewhere)."""
    status = Path("/proc/self/status")
    text = status.read_text() if status.exists() else ""
    return {k: int(line.split()[1]) / 1024 for line in text.splitlines() for k in ("RssAnon", "RssFile")
            if line.startswith(k + ":")}


def read_loop(reader, ids: list[str]) -> float:
    """Seconds to read ``ids`` one by one."""
    start = time.perf_counter()
    for bag_id in ids:
        reader.read(bag_id)
    return time.perf_counter() - start


class _Items:
    """DataLoader dataset: an item is one bag id, or a list of ids packed into (x, ptr)."""

    def __init__(self, reader, ids: list[str]) -> None:
        self.reader, self.ids = reader, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        import torch
        if isinstance(index, list):  # the training pipeline: packed in the worker
            x, ptr = self.reader.read_packed([self.ids[i] for i in index])
            return torch.from_numpy(x), torch.from_numpy(np.asarray(ptr))
        return torch.from_numpy(self.reader.read(self.ids[index]))


def loader_rate(reader, ids: list[str], workers: int, per_batch: int) -> float:
    """Bags/s through a DataLoader (timed from the first item, so worker start-up is excluded)."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    sampler = BatchSampler(SequentialSampler(range(len(ids))), per_batch, drop_last=False) if per_batch > 1 else None
    loader = DataLoader(_Items(reader, ids), sampler=sampler, batch_size=None, num_workers=workers)
    next(it := iter(loader))
    start = time.perf_counter()
    bags = sum(len(item[1]) - 1 if per_batch > 1 else 1 for item in it)
    return bags / max(time.perf_counter() - start, 1e-9)


def measure(name: str, data: Data, work: Path, base, args) -> dict:
    """All measurements of one layout, interleaved with the memmap limit for the ratios."""
    reps = 1 if name in SLOW else args.repeats
    src = BANK.get(name, (None, None, None))[2]
    row: dict = {"layout": name, "dim": data.x.shape[1]}
    if src is None:
        writes, limit = [], []
        for rep in range(max(reps, 2)):  # alternating which goes first; each starts with no dirty pages
            for which in (("limit", "layout") if rep % 2 else ("layout", "limit")):
                if which == "limit":
                    shutil.rmtree(work / "memmap-w", ignore_errors=True)
                    limit.append(timed(lambda: write_layout("memmap", data, work / "memmap-w"))[0])
                elif rep < reps:
                    shutil.rmtree(work / name, ignore_errors=True)
                    t, reader = timed(lambda: write_layout(name, data, work / name))
                    writes.append(t)
        shutil.rmtree(work / "memmap-w", ignore_errors=True)
        row.update(write_s=min(writes), write_mb_s=data.x.nbytes / 1e6 / min(writes),
                   write_ratio=min(limit) / min(writes), size_mb=disk_bytes(work / name) / 1e6)
    else:
        from feature_cache.bank import open_reader

        reader = open_reader(next((work / src).glob("bank.*")), **BANK[name][1])
    for folder in (work / (src or name), work / "limit"):
        warm(folder)
    ids = [data.ids[i] for i in data.order]
    probe = ids[: max(1, len(ids) // 50)]
    t_one = read_loop(reader, probe) / len(probe)
    n = len(ids) if name not in SLOW else int(min(len(ids), max(100, args.budget / max(t_one, 1e-9))))
    sub = ids[:n]
    mem0 = rss()
    read_loop(reader, sub)  # the reader's first full pass: how much resident memory does it keep?
    mem1 = rss()

    def paired(rate) -> tuple[float, float]:  # best rate, and its ratio to the limit's best (alternating)
        got, limit = [], []
        for i in range(max(reps, 3)):
            got += [rate(reader)] if i < reps else []
            limit.append(rate(base))
        return max(got), max(got) / max(limit)

    best, ratio = paired(lambda r: n / read_loop(r, sub))
    mb = sum(data.sizes[b] for b in sub) * data.x[0].nbytes / 1e6
    row.update(bags_read=n, read_bags_s=best, read_mb_s=best * mb / n, read_ratio=ratio,
               rss_anon_mb=mem1.get("RssAnon", 0) - mem0.get("RssAnon", 0),
               rss_file_mb=mem1.get("RssFile", 0) - mem0.get("RssFile", 0))
    k = min(n, args.loader_bags)
    for key, workers, per in (("dl0", 0, 1), ("dl2", 2, 1), ("pipe2", 2, 8)):
        row[f"{key}_bags_s"], row[f"{key}_ratio"] = paired(lambda r, w=workers, p=per: loader_rate(r, ids[:k], w, p))
    getattr(reader, "close", lambda: None)()
    return row


def timed(fn):
    """(seconds, result) of ``fn()``, started with no dirty pages in the page cache."""
    os.sync()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# -- checksum cost --------------------------------------------------------------------------------
def crc_speed(x: np.ndarray) -> dict[str, float]:
    """GB/s of each checksum algorithm over the whole feature matrix (best of 3, one thread)."""
    from feature_cache.bank.checksum import ALGORITHMS, checksum_function

    out = {}
    for algorithm in ALGORITHMS:
        fn = checksum_function(algorithm, "bench")
        best = min(timed_plain(lambda fn=fn: fn(x)) for _ in range(3))
        out[algorithm] = x.nbytes / 1e9 / best
    return out


def timed_plain(fn) -> float:
    """Seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_bank(data: Data, path: Path, checksum: str | None) -> float:
    """Seconds to write ``data`` as a bank at ``path`` (``checksum``: None, "crc32c" or "crc32")."""
    import feature_cache.bank.writer as writer_module
    from feature_cache.bank import EncoderInfo, open_writer

    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    info = EncoderInfo("bench", "1", "", "none", data.x.shape[1])
    default = writer_module.default_algorithm
    writer_module.default_algorithm = lambda: checksum or "crc32c"  # pick the algorithm of this write
    try:
        def write() -> None:
            with open_writer(path, info, "w", checksum=checksum is not None) as w:
                for i in range(len(data.ids)):
                    w.append(data.ids[i], *data.bag(i))
        return timed(write)[0]
    finally:
        writer_module.default_algorithm = default


def checksum_cost(data: Data, work: Path, repeats: int) -> list[dict]:
    """Write throughput with and without checksums, and whole-bag reads with and without the check."""
    from feature_cache.bank import open_reader

    work.mkdir(parents=True, exist_ok=True)
    variants = (None, "crc32c", "crc32")
    rows = []
    mb = data.x.nbytes / 1e6
    speed = crc_speed(data.x)
    for suffix in (".h5", ".zarr"):
        times: dict[str | None, list[float]] = {v: [] for v in variants}
        for rep in range(repeats):  # rotate the order so no variant always writes first
            for k in range(len(variants)):
                v = variants[(k + rep) % len(variants)]
                times[v].append(write_bank(data, work / f"crc-{v}{suffix}", v))
        best = {v: min(t) for v, t in times.items()}

        def paired(v: str, times: dict = times) -> float:  # median over rounds of unchecked / checked time
            return float(np.median(np.asarray(times[None]) / np.asarray(times[v])))

        row = {"dim": data.x.shape[1], "backend": "hdf5" if suffix == ".h5" else "zarr",
               "unchecked_mb_s": mb / best[None], "crc32c_mb_s": mb / best["crc32c"], "crc32_mb_s": mb / best["crc32"],
               "crc32c_ratio": paired("crc32c"), "crc32_ratio": paired("crc32"),
               "crc32c_best_ratio": best[None] / best["crc32c"], "crc32_best_ratio": best[None] / best["crc32"],
               "crc32c_gb_s": speed["crc32c"], "crc32_gb_s": speed["crc32"], "repeats": repeats}
        path = work / f"crc-crc32c{suffix}"
        warm(path if path.is_dir() else path.parent)
        ids = [data.ids[i] for i in data.order]
        rates: dict[str, list[float]] = {"first": [], "plain": [], "steady": [], "plain2": []}
        for rep in range(max(3, repeats)):  # first passes of fresh readers: the checker checks every bag
            for key in (("first", "plain") if rep % 2 else ("plain", "first")):
                with open_reader(path, checksums=key == "first") as reader:
                    rates[key].append(len(ids) / read_loop(reader, ids))
        with open_reader(path) as checked, open_reader(path, checksums=False) as plain_reader:
            read_loop(checked, ids), read_loop(plain_reader, ids)  # every bag checked once
            for rep in range(max(3, repeats)):  # later passes, alternating the two readers
                for key, reader in ((("steady", checked), ("plain2", plain_reader)) if rep % 2 else
                                    (("plain2", plain_reader), ("steady", checked))):
                    rates[key].append(len(ids) / read_loop(reader, ids))
        plain = max(rates["plain"])
        row.update(read_plain_bags_s=plain, read_first_bags_s=max(rates["first"]),
                   read_first_ratio=max(rates["first"]) / plain,
                   read_steady_ratio=max(rates["steady"]) / max(rates["plain2"]))
        rows.append(row)
        for v in variants:
            p = work / f"crc-{v}{suffix}"
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return rows


CRC_COLUMNS = (("dim", "{:d}"), ("backend", "{}"), ("unchecked_mb_s", "{:.0f}"), ("crc32c_mb_s", "{:.0f}"),
               ("crc32c_ratio", "{:.2f}x"), ("crc32c_best_ratio", "{:.2f}x"), ("crc32_mb_s", "{:.0f}"),
               ("crc32_ratio", "{:.2f}x"),
               ("read_plain_bags_s", "{:.0f}"), ("read_first_bags_s", "{:.0f}"), ("read_first_ratio", "{:.2f}x"),
               ("read_steady_ratio", "{:.2f}x"),
               ("crc32c_gb_s", "{:.1f}"), ("crc32_gb_s", "{:.1f}"))


def checksum_targets(rows: list[dict]) -> list[dict]:
    """Checksummed (CRC-32C) write throughput / unchecked, per backend, against :data:`CHECKSUM_FLOOR`.

    The value is the median over repetitions of the ratio of two writes of the same round (robust to
    a shared machine's drifting load); the ratio of the best times is printed beside it.
    """
    return [{"dim": r["dim"], "target": f"{r['backend']} write with CRC-32C checksums / without",
             "value": round(r["crc32c_ratio"], 3), "floor": CHECKSUM_FLOOR, "aim": None,
             "met": bool(r["crc32c_ratio"] >= CHECKSUM_FLOOR)} for r in rows]


COLUMNS = (("dim", "{:d}"), ("layout", "{}"), ("write_s", "{:.2f}"), ("write_mb_s", "{:.0f}"),
           ("write_ratio", "{:.2f}x"), ("size_mb", "{:.0f}"), ("read_bags_s", "{:.0f}"), ("read_mb_s", "{:.0f}"),
           ("read_ratio", "{:.2f}x"), ("dl0_bags_s", "{:.0f}"), ("dl2_bags_s", "{:.0f}"),
           ("pipe2_bags_s", "{:.0f}"), ("pipe2_ratio", "{:.2f}x"), ("rss_anon_mb", "{:.0f}"), ("rss_file_mb", "{:.0f}"))


def table(rows: list[dict], columns: tuple = COLUMNS) -> str:
    """Markdown table of the result rows."""
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    lines = [head, "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt.format(row[c]) if row.get(c) is not None else "-" for c, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict], dim: int) -> list[dict]:
    """The issue's targets, evaluated on the rows of feature width ``dim``."""
    by = {r["layout"]: r for r in rows if r["dim"] == dim}
    out = []

    def add(name: str, value: float | None, floor: float, aim: float | None = None) -> None:
        if value is not None:
            out.append({"dim": dim, "target": name, "value": round(value, 3), "floor": floor, "aim": aim,
                        "met": bool(value >= floor)})

    for layout in ("hdf5", "zarr"):
        r = by.get(layout, {})
        if layout == "hdf5":
            add("hdf5 random whole-bag reads / memmap", r.get("read_ratio"), 0.5, 0.8)
        add(f"{layout} training pipeline (2 workers, 8 bags/batch) / memmap", r.get("pipe2_ratio"), 0.7)
        add(f"{layout} write throughput / memmap", r.get("write_ratio"), 0.5)
        if r.get("rss_anon_mb") is not None:
            bank_mb = max(r.get("size_mb", 1.0), 1e-6)
            add(f"{layout} reader memory: 1 - (RSS growth after reading every bag / bank size)",
                1 - max(r["rss_anon_mb"], r["rss_file_mb"], 0) / bank_mb, 0.9)
    if "zarr" in by and "clam-h5" in by:
        add("zarr reads / CLAM per-slide h5 reads", by["zarr"]["read_bags_s"] / by["clam-h5"]["read_bags_s"], 1.0, 2.0)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and writes ``bench.json`` under ``--out``."""
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--bags", type=int, default=2000)
    p.add_argument("--median", type=int, default=300, help="median cells per bag")
    p.add_argument("--dims", default="512,1280", help="comma-separated feature widths")
    p.add_argument("--layouts", default="", help="comma-separated layouts (default: per width, see the code)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions of fast layouts (best of N)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of reading per slow layout")
    p.add_argument("--loader-bags", type=int, default=2000, help="bags per DataLoader measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary folder)")
    p.add_argument("--out", default="benchmarks/results/bank_io")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (40 bags, 32-d)")
    p.add_argument("--checksums-only", action="store_true",
                   help="only the checksum cost (writes with/without checksums, reads with/without the check)")
    p.add_argument("--no-checksums", action="store_true", help="skip the checksum cost section")
    args = p.parse_args(argv)
    if args.quick:
        args.bags, args.median, args.dims, args.repeats, args.budget, args.loader_bags = 40, 20, "32", 1, 0.2, 40
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(1)
    logging.getLogger("feature_cache.bank").setLevel(logging.WARNING)
    rows: list[dict] = []
    checks: list[dict] = []
    crc_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_bank_io_", dir=args.work) as tmp:
        for dim in (int(d) for d in args.dims.split(",")):
            layouts = args.layouts.split(",") if args.layouts else DEFAULT_LAYOUTS.get(dim, DEFAULT_LAYOUTS[512])
            data = Data(args.bags, args.median, dim, args.seed)
            log.info("%d-d: %d bags, %d cells, %.0f MB of features", dim, args.bags, len(data.x), data.x.nbytes / 1e6)
            work = Path(tmp) / str(dim)
            if not args.no_checksums:
                crc_rows += checksum_cost(data, work / "crc", args.repeats)
                log.info("%s", table(crc_rows[-2:], CRC_COLUMNS))
            if args.checksums_only:
                continue
            base = write_layout("memmap", data, work / "limit")
            for name in layouts:
                if name == "hdf5-blosc-zstd" and importlib.util.find_spec("hdf5plugin") is None:
                    log.info("skipping %s (hdf5plugin not installed)", name)
                    continue
                row = measure(name, data, work, base, args)
                rows.append(row)
                log.info("%s", table([row]).splitlines()[-1])
                if BANK.get(name, (0, 0, None))[2] is None and name not in ("hdf5", "zarr"):
                    shutil.rmtree(work / name, ignore_errors=True)  # keep the page cache small
            checks += targets(rows, dim)
            shutil.rmtree(work, ignore_errors=True)
            del data, base
    crc_checks = checksum_targets(crc_rows)

    def verdicts(items: list[dict]) -> list[str]:
        return [f"- {'MET' if c['met'] else 'NOT MET'}: {c['dim']}-d {c['target']} = {c['value']:.2f} "
                f"(floor {c['floor']}" + ("" if c["aim"] is None else f", aim {c['aim']}") + ")" for c in items]

    parts = []
    if rows:
        parts.append(table(rows) + "\n\n" + "\n".join(verdicts(checks)))
    if crc_rows:
        parts.append("Checksum cost:\n\n" + table(crc_rows, CRC_COLUMNS) + "\n\n" + "\n".join(verdicts(crc_checks)))
    sys.stdout.write("\n\n".join(parts) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    command = "python benchmarks/bench_bank_io.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name, body in (("bench.json", {"rows": rows, "targets": checks}),
                       ("checksums.json", {"rows": crc_rows, "targets": crc_checks})):
        if body["rows"]:
            (out / name).write_text(json.dumps(
                {"benchmark": "bank_io", "config": config, "machine": machine, **body, "command": command}, indent=1))
            log.info("wrote %s", out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
