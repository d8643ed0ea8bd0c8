"""Interop with CLAM / TRIDENT feature folders: one ``<slide>.h5`` per bag.

Each file holds ``features`` ``(n, D)`` (CLAM writes float32, one-row chunks) and ``coords``
``(n, 2)`` int64 patch positions, with attributes on the root and on ``coords`` (TRIDENT: patch
size, magnification, ...). CLAM keeps them in ``<dir>/h5_files/`` (and torch copies in
``<dir>/pt_files/``); TRIDENT in ``<job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/``.

Import maps a file to a bag (id = file stem): scalar attributes become per-bag metadata columns
(``coords.<name>`` / ``features.<name>`` for dataset attributes). Export writes the reverse, and
stores the encoder fingerprint as a root attribute so a round trip keeps it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from feature_cache.bank.errors import BankError
from feature_cache.bank.reader import open_reader
from feature_cache.bank.schema import EncoderInfo, meta_kind
from feature_cache.bank.writer import open_writer

log = logging.getLogger("feature_cache.bank")
_PREFIXED = ("coords", "features")


def find_h5_files(folder: str | Path) -> list[Path]:
    """The per-slide ``.h5`` files of a CLAM/TRIDENT folder (``h5_files/`` if present), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BankError(f"{folder}: not a folder of per-slide .h5 files")
    root = folder / "h5_files" if (folder / "h5_files").is_dir() else folder
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".h5", ".hdf5") and p.is_file())
    if not files:
        raise BankError(f"{root}: no .h5 files found")
    return files


def _scalar(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    return value if meta_kind(value) is not None else None


def _file_meta(f: h5py.File) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    sources = [("", f.attrs)] + [(f"{n}.", f[n].attrs) for n in _PREFIXED if n in f]
    for prefix, attrs in sources:
        for key, value in attrs.items():
            value = _scalar(value)
            if value is not None and key != "encoder":
                meta[prefix + key.replace("/", "_").replace(" ", "_")] = value
    return meta


def _read_slide(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any], str | None]:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise BankError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]})") from None
    with f:
        if "features" not in f:
            raise BankError(f"{path}: has no 'features' dataset (not a CLAM/TRIDENT feature file)")
        x = np.asarray(f["features"][()])
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim == 1 and x.size == 0:
            x = x.reshape(0, 0)
        if x.ndim != 2:
            raise BankError(f"{path}: 'features' has shape {x.shape}, expected (n, D)")
        coords = None
        if "coords" in f:
            coords = np.asarray(f["coords"][()]).reshape(-1, 2) if f["coords"].size else np.empty((0, 2))
            if len(coords) != len(x):
                raise BankError(f"{path}: {len(coords)} coords for {len(x)} feature rows")
        encoder = f.attrs.get("encoder")
        return x, coords, _file_meta(f), encoder.decode() if isinstance(encoder, bytes) else encoder


def _fit_meta(meta: dict[str, Any], kinds: dict[str, str], where: Path) -> dict[str, Any]:
    """Keep values whose kind fits the column seen first (files of one folder may disagree)."""
    out = {}
    for key, value in meta.items():
        kind, known = meta_kind(value), kinds.get(key)
        if known is None or known == kind or (known == "float" and kind == "int"):
            kinds.setdefault(key, kind)  # type: ignore[arg-type]
            out[key] = value
        elif known == "int" and kind == "float" and float(value).is_integer():
            out[key] = int(value)
        else:
            log.warning("%s: attribute %s=%r does not fit the %s column; skipped", where, key, value, known)
    return out


def import_clam(
    folder: str | Path,
    output: str | Path,
    *,
    info: EncoderInfo | None = None,
    encoder: str | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    compression: str | None = None,
    checksum: bool = False,
) -> dict[str, Any]:
    """Build a bank from a CLAM/TRIDENT folder of per-slide ``.h5`` files (empty files allowed).

    Args:
        folder: the folder (or its parent holding ``h5_files/``).
        output: the new bank.
        info: encoder fingerprint; default: the one stored by :func:`export_clam`, else a
            fingerprint named ``encoder`` (or the folder name) with unknown version and weights.
        encoder: encoder name for that default fingerprint.
        overwrite: replace an existing bank.
        dtype: stored dtype (default float16; float32 keeps CLAM's precision).
        compression: as in :func:`~feature_cache.bank.open_writer`.
        checksum: store per-bag CRC-32s.

    Returns:
        Summary with ``bags``, ``instances``, ``empty_bags`` and ``dim``.
    """
    files = find_h5_files(folder)
    slides = (_read_slide(p) for p in files)
    first = next((s for s in (_read_slide(p) for p in files) if s[0].shape[1] or s[3]), None)
    if first is None:
        raise BankError(f"{folder}: every .h5 file is empty; cannot tell the feature dimension")
    if info is None:
        if first[3] and encoder is None:
            info = EncoderInfo.from_dict(first[3])
        else:
            name = encoder or Path(folder).name.removeprefix("features_") or "imported"
            info = EncoderInfo(name, "unknown", "", "unknown (imported CLAM/TRIDENT features)", first[0].shape[1])
    writer = open_writer(output, info, "w" if overwrite else "x", dtype=dtype, compression=compression,
                         checksum=checksum)
    kinds: dict[str, str] = {}
    empty = 0
    try:
        for path, (x, coords, meta, _) in zip(files, slides, strict=True):
            if x.size == 0:
                x, empty = np.empty((0, info.dim), np.float32), empty + 1
            elif x.shape[1] != info.dim:
                raise BankError(f"{path}: {x.shape[1]}-d features, but the bank is {info.dim}-d")
            writer.append(path.stem, x, coords, meta=_fit_meta(meta, kinds, path))
    except BaseException:
        writer.discard()
        raise
    writer.close()
    with open_reader(output) as bank:
        summary = {"output": str(output), "source": str(folder), "bags": len(bank),
                   "instances": bank.num_instances, "empty_bags": empty, "dim": bank.dim}
    log.info("imported %d files from %s into %s (%d empty)", len(files), folder, output, empty)
    return summary


def export_clam(
    bank: str | Path, folder: str | Path, *, pt: bool = False, dtype: str = "float32", overwrite: bool = False
) -> dict[str, Any]:
    """Write a bank as a CLAM folder: ``<folder>/h5_files/<bag>.h5`` (+ ``pt_files/<bag>.pt``).

    Args:
        bank: the bank to export.
        folder: output folder (created).
        pt: also write torch tensors to ``pt_files/`` (what CLAM's training reads).
        dtype: feature dtype of the files (CLAM uses float32).
        overwrite: replace files that already exist (else any existing file is an error).

    Returns:
        Summary with ``files`` and ``folder``.
    """
    folder = Path(folder)
    with open_reader(bank) as reader:
        ids = reader.bag_ids()
        bad = [b for b in ids if "/" in b or "\\" in b or b.startswith(".")]
        if bad:
            raise BankError(f"{bank}: bag id {bad[0]!r} is not a valid file name")
        h5_dir, pt_dir = folder / "h5_files", folder / "pt_files"
        clash = [h5_dir / f"{b}.h5" for b in ids if (h5_dir / f"{b}.h5").exists()]
        if clash and not overwrite:
            raise BankError(f"{clash[0]}: already exists (use --overwrite to replace {len(clash)} files)")
        h5_dir.mkdir(parents=True, exist_ok=True)
        torch = None
        if pt:
            import torch

            pt_dir.mkdir(exist_ok=True)
        meta = reader.bag_meta
        encoder = json.dumps(reader.info.to_dict(), sort_keys=True)
        from feature_cache.bank.merge import bag_meta_row
        from feature_cache.progress import progress

        for i, bag_id in enumerate(progress(ids, desc="exporting", unit="file")):
            x = reader.read(bag_id).astype(dtype)
            coords = reader.read_coords(bag_id).astype(np.int64)
            tmp = h5_dir / f".{bag_id}.h5.tmp"
            with h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=x)
                f.create_dataset("coords", data=coords)
                f.attrs["encoder"] = encoder
                for key, value in bag_meta_row(reader, meta, i).items():
                    head, _, rest = key.partition(".")
                    target = f[head].attrs if head in _PREFIXED and rest else f.attrs
                    target[rest if head in _PREFIXED and rest else key] = value
            os.replace(tmp, h5_dir / f"{bag_id}.h5")
            if torch is not None:
                torch.save(torch.from_numpy(x), pt_dir / f"{bag_id}.pt")
    log.info("exported %d bags of %s to %s", len(ids), bank, h5_dir)
    return {"bank": str(bank), "folder": str(folder), "files": len(ids), "pt_files": len(ids) if pt else 0}
