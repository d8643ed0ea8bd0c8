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

from feature_cache.bank.errors import BankError, first_line
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


def _file_meta(f: h5py.File, path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    sources = [("", f.attrs)] + [(f"{n}.", f[n].attrs) for n in _PREFIXED if isinstance(f.get(n), h5py.Dataset)]
    for prefix, attrs in sources:
        for key in attrs:
            try:
                value = _scalar(attrs[key])
            except (OSError, TypeError, ValueError) as exc:  # an attribute type h5py cannot read
                log.warning("%s: attribute %r skipped (%s)", path, key, first_line(exc))
                continue
            if value is not None and key != "encoder":
                meta[prefix + key.replace("/", "_").replace(" ", "_")] = value
    return meta


def _dataset(f: h5py.File, name: str, path: Path) -> np.ndarray:
    node = f.get(name)
    if not isinstance(node, h5py.Dataset):
        raise BankError(f"{path}: '{name}' is not a dataset (not a CLAM/TRIDENT feature file)")
    if node.dtype.kind not in "fiu":
        raise BankError(f"{path}: '{name}' holds {node.dtype} values, expected numbers")
    try:
        return np.asarray(node[()])
    except Exception as exc:  # a truncated or damaged file
        raise BankError(f"{path}: cannot read '{name}' ({first_line(exc)})") from None


def _read_slide(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any], str | None]:
    """One file's features ``(n, D)``, coords ``(n, 2)`` or None, metadata and stored encoder JSON.

    Raises:
        BankError: naming ``path``: unreadable, no features, wrong shapes or types, NaN/Inf.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise BankError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]})") from None
    with f:
        if "features" not in f:
            raise BankError(f"{path}: has no 'features' dataset (not a CLAM/TRIDENT feature file)")
        x = _dataset(f, "features", path)
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim == 1 and x.size == 0:
            x = x.reshape(0, 0)
        if x.ndim != 2:
            raise BankError(f"{path}: 'features' has shape {x.shape}, expected (n, D)")
        if x.dtype.kind == "f":
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            if bad:
                raise BankError(f"{path}: {bad} NaN/Inf feature values")
        coords = None
        if "coords" in f:
            coords = _dataset(f, "coords", path)
            if coords.ndim == 3 and coords.shape[0] == 1:
                coords = coords[0]
            if coords.size == 0 and len(x) == 0:
                coords = np.empty((0, 2), np.int64)
            if coords.ndim != 2 or coords.shape[1] != 2:
                raise BankError(f"{path}: 'coords' has shape {coords.shape}, expected ({len(x)}, 2)")
            if len(coords) != len(x):
                raise BankError(f"{path}: {len(coords)} coords for {len(x)} feature rows")
            if coords.dtype.kind == "f" and not np.isfinite(coords).all():
                raise BankError(f"{path}: 'coords' contain NaN/Inf")
        encoder = f.attrs.get("encoder")
        encoder = encoder.decode("utf-8", "replace") if isinstance(encoder, bytes) else encoder
        return x, coords, _file_meta(f, path), encoder if isinstance(encoder, str) else None


def _stored_encoders(files: list[Path]) -> list[tuple[Path, EncoderInfo]]:
    """The encoder fingerprint stored in each file that has one (``export_clam`` writes it)."""
    out = []
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("encoder")
        except OSError as exc:
            raise BankError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]})") from None
        except Exception as exc:  # an attribute h5py cannot read
            raise BankError(f"{path}: unreadable attribute 'encoder' ({first_line(exc)})") from None
        if raw is None:
            continue
        raw = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            if not isinstance(raw, str):
                raise BankError(f"not a JSON string but {type(raw).__name__}")
            out.append((path, EncoderInfo.from_dict(raw)))
        except BankError as exc:
            raise BankError(f"{path}: attribute 'encoder': {exc}") from None
    return out


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
    checksum: bool | None = None,
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
        checksum: store per-bag checksums (default: as for any new bank).

    Returns:
        Summary with ``bags``, ``instances``, ``empty_bags`` and ``dim``.
    """
    files = find_h5_files(folder)
    stems: dict[str, Path] = {}
    for path in files:  # one bag per file stem
        if path.stem in stems:
            raise BankError(f"{path}: same bag id {path.stem!r} as {stems[path.stem]} (rename one of them)")
        stems[path.stem] = path
    stored = [] if info is not None or encoder is not None else _stored_encoders(files)
    if info is None:
        if stored:  # written by export_clam: every file names the same encoder
            info = stored[0][1]
            for path, other in stored[1:]:
                info.check_compatible(other, where=f"{path} (attribute 'encoder', vs {stored[0][0].name})")
        else:
            dim = next((s[0].shape[1] for s in (_read_slide(p) for p in files) if s[0].shape[1]), None)
            if dim is None:
                raise BankError(f"{folder}: every .h5 file is empty; cannot tell the feature dimension")
            name = encoder or Path(folder).name.removeprefix("features_") or "imported"
            info = EncoderInfo(name, "unknown", "", "unknown (imported CLAM/TRIDENT features)", dim)
    slides = (_read_slide(p) for p in files)
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
            try:
                writer.append(path.stem, x, coords, meta=_fit_meta(meta, kinds, path))
            except BankError as exc:  # name the source file, not only the bank being written
                raise BankError(f"{path}: cannot import: {str(exc).removeprefix(f'{output}: ')}") from None
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
