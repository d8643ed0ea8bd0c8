"""Property-based bad-input suite for the bank reader and the CLAM/TRIDENT import (issue 13).

Each example writes a small bank (or a folder of per-slide ``.h5`` files), damages it in one way
and checks the rule: it either loads and then reads exactly the values written, or it fails with a
one-line :class:`~feature_cache.errors.UserError` naming the file — never an internal error or a
wrong answer. ``verify`` (library and ``milcore bank verify`` in-process) flags every bank the
reader refuses, and passes every bank that reads back exactly.

Damage that no reader can see without a checksum (a flipped feature byte, a moved bag boundary)
is drawn only for banks written with checksums; NaN/Inf written into an unchecked bank is read as
stored and must be reported by ``verify``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feature_cache.bank import EncoderInfo, open_reader, open_writer
from feature_cache.bank.clam import import_clam
from feature_cache.bank.verify import verify_bank
from feature_cache.errors import UserError
from milcore.cli import main

DIM = 8
INFO = EncoderInfo("fuzz", "1", "", "none", DIM)
#: Deterministic examples (the same in CI on every run); widen the search locally with
#: ``FUZZ_EXAMPLES=2000 pytest tests/bank/test_bank_fuzz.py``.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 45)), deadline=None, database=None,
                derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TYPES = np.array(["blast", "lymphocyte", "neutrophil"])


@dataclass
class Bag:
    bag_id: str
    x: np.ndarray  # (n, D) float16 as stored
    coords: np.ndarray  # (n, 2) int32
    cell_id: list[str]
    cell_type: list[str]
    meta: dict


def _bags(rng: np.random.Generator) -> list[Bag]:
    bags = []
    for i in range(int(rng.integers(2, 6))):
        n = 0 if i == 1 else int(rng.integers(1, 30))
        x = rng.standard_normal((n, DIM)).astype(np.float16)
        bags.append(Bag(f"p{i}", x, rng.integers(0, 5000, (n, 2)).astype(np.int32),
                        [f"c{i}_{j}" for j in range(n)], list(TYPES[rng.integers(0, 3, n)]),
                        {"site": f"s{i % 2}", "n": n, "score": i / 3, "ok": bool(i % 2)}))
    return bags


def _write(path: Path, bags: list[Bag], **kwargs) -> None:
    with open_writer(path, INFO, "x", **kwargs) as w:
        for b in bags:
            w.append(b.bag_id, b.x, b.coords, cell_id=b.cell_id, cell_type=b.cell_type, meta=b.meta)


def _reads_exactly(reader, bags: list[Bag]) -> bool:
    """Whether every value the reader returns is the value written (absent optional columns aside)."""
    if reader.bag_ids() != [b.bag_id for b in bags]:
        return False
    for b in bags:
        x = reader.read(b.bag_id)
        if x.shape != b.x.shape or not np.array_equal(x.astype(np.float32), b.x.astype(np.float32)):
            return False
        if not np.array_equal(reader.read_coords(b.bag_id), b.coords):
            return False
        if "cell_id" in reader.columns and list(reader.read_column(b.bag_id, "cell_id")) != b.cell_id:
            return False
        if "cell_type" in reader.columns and list(reader.read_column(b.bag_id, "cell_type")) != b.cell_type:
            return False
    x, _ = reader.read_packed([b.bag_id for b in reversed(bags)])
    if not np.array_equal(x.astype(np.float32), np.concatenate([b.x for b in reversed(bags)]).astype(np.float32)):
        return False
    return all(list(values) == [b.meta[name] for b in bags] for name, values in reader.bag_meta.items())


# -- damage ---------------------------------------------------------------------------------------
ZARR_DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32", "bool"]
ROOT_ATTRS = ["format", "format_version", "encoder", "created", "modified", "generated_by"]
ARRAY_ATTRS = {"bags/checksum": "algorithm", "instances/cell_type": "names", "bags/site": "kind",
               "bags/n": "kind", "bags/score": "kind", "bags/ok": "kind"}
COMMON = ["offsets", "bag_ids", "nonfinite", "root_attr", "array_attr", "dtype", "rows"]
ZARR_ONLY = ["delete_chunk", "truncate_chunk", "extend_chunk", "garble_compressed_chunk", "chunk_shape"]
HDF5_ONLY = ["truncate_file", "extend_file", "delete_dataset"]
CHECKED_ONLY = ["flip_feature_byte", "shift_boundary"]


def _arrays(path: Path, suffix: str) -> list[str]:
    if suffix == ".zarr":
        return sorted(str(p.parent.relative_to(path)) for p in path.rglob("zarr.json") if p.parent != path
                      and json.loads(p.read_text())["node_type"] == "array")
    with h5py.File(path, "r") as f:
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        return sorted(names)


def _replace(path: Path, suffix: str, name: str, values: np.ndarray) -> None:
    """Rewrite array ``name`` with ``values`` (any length), keeping its attributes."""
    if suffix == ".h5":
        with h5py.File(path, "r+") as f:
            attrs = dict(f[name].attrs)
            del f[name]
            kw = {"dtype": h5py.string_dtype()} if values.dtype == object else {}
            f.create_dataset(name, data=values, **kw).attrs.update(attrs)
        return
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    attrs = dict(group[name].attrs)
    arr = group.create_array(name, shape=values.shape, chunks=(max(1, len(values)),),
                             dtype=str if values.dtype == object else values.dtype, overwrite=True,
                             chunk_key_encoding={"name": "default", "separator": "."},
                             config={"write_empty_chunks": True})
    if values.size:
        arr[...] = values
    arr.attrs.update(attrs)


def _set_feature(path: Path, suffix: str, row: int, col: int, value: float) -> None:
    if suffix == ".h5":
        with h5py.File(path, "r+") as f:
            f["instances/features"][row, col] = value
    else:
        zarr.open_array(path / "instances/features", mode="r+")[row, col] = value


def _edit_zarr_json(path: Path, name: str, edit) -> None:
    meta_path = path / name / "zarr.json" if name else path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))


def damage(path: Path, suffix: str, kind: str, bags: list[Bag], rng: np.random.Generator) -> str:
    """Apply one kind of damage; returns a description (for the failure message)."""
    offsets = np.concatenate([[0], np.cumsum([len(b.x) for b in bags])]).astype(np.int64)
    N, arrays = int(offsets[-1]), _arrays(path, suffix)
    pick = arrays[int(rng.integers(len(arrays)))]
    if kind == "offsets":
        how = ["decreasing", "not_ending_at_n", "too_long", "too_short", "not_starting_at_0"][int(rng.integers(5))]
        bad = offsets.copy()
        if how == "decreasing":
            bad[-2] = bad[-1] + 1
        elif how == "not_ending_at_n":
            bad[-1] = max(bad[-2], N + int(rng.integers(1, 5)) * (1 if rng.random() < 0.5 else -1))
            bad[-1] += 1 if bad[-1] == N else 0  # the last bag may be empty: still end elsewhere than N
        elif how == "too_long":
            bad = np.append(bad, N)
        elif how == "too_short":
            bad = bad[:-1]
        else:
            bad[0] = 1
        _replace(path, suffix, "indexes/bag_offset", bad)
        return f"offsets {how}: {bad.tolist()}"
    if kind == "shift_boundary":
        i = int(rng.integers(1, len(bags)))  # the boundary between bags i-1 and i moves by one row
        bad = offsets.copy()
        bad[i] += 1 if bad[i + 1] > bad[i] else -1  # bag 0 is never empty, so one of the two is possible
        _replace(path, suffix, "indexes/bag_offset", bad)
        return f"bag boundary {i} moved: {bad.tolist()}"
    if kind == "bag_ids":
        ids = np.array([b.bag_id for b in bags], dtype=object)
        j = int(rng.integers(1, len(ids)))
        ids[j] = "" if rng.random() < 0.5 else ids[0]
        _replace(path, suffix, "bags/bag_id", ids)
        return f"bag ids {ids.tolist()}"
    if kind == "nonfinite":
        row, col = int(rng.integers(N)), int(rng.integers(DIM))
        value = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
        _set_feature(path, suffix, row, col, value)
        return f"{value} at row {row}"
    if kind == "flip_feature_byte":
        row, col = int(rng.integers(N)), int(rng.integers(DIM))
        stored = np.array([_read_raw(path, suffix, row, col)], np.float16)
        flipped = stored.view(np.uint16) ^ np.uint16(1 << int(rng.integers(10)))  # a mantissa bit
        _set_feature(path, suffix, row, col, float(flipped.view(np.float16)[0]))
        return f"bit flipped at row {row}, column {col}"
    if kind == "root_attr":
        attr = ROOT_ATTRS[int(rng.integers(len(ROOT_ATTRS)))]
        if suffix == ".h5":
            with h5py.File(path, "r+") as f:
                del f.attrs[attr]
        else:
            _edit_zarr_json(path, "", lambda m: m["attributes"].pop(attr))
        return f"root attribute {attr!r} removed"
    if kind == "array_attr":
        name = [n for n in ARRAY_ATTRS if n in arrays][int(rng.integers(len([n for n in ARRAY_ATTRS if n in arrays])))]
        attr = ARRAY_ATTRS[name]
        if suffix == ".h5":
            with h5py.File(path, "r+") as f:
                del f[name].attrs[attr]
        else:
            _edit_zarr_json(path, name, lambda m: m["attributes"].pop(attr))
        return f"attribute {attr!r} of {name} removed"
    if kind == "dtype":
        new = ZARR_DTYPES[int(rng.integers(len(ZARR_DTYPES)))]
        if suffix == ".h5":
            with h5py.File(path, "r+") as f:
                values = f[pick][()]
            if values.dtype == object or values.dtype.kind in "SO":
                values = np.arange(len(values))
            with np.errstate(all="ignore"):
                _replace(path, suffix, pick, np.asarray(values).astype(new))
        else:
            _edit_zarr_json(path, pick, lambda m: m.update(data_type=new, fill_value=0))
        return f"{pick} retyped as {new}"
    if kind == "rows":
        delta = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
        if suffix == ".h5":
            with h5py.File(path, "r+") as f:
                values = f[pick][()]
            if delta > 0:
                values = np.concatenate([values, values[: 1].repeat(delta, 0)]) if len(values) else values
            else:
                values = values[:delta]
            _replace(path, suffix, pick, np.asarray(values))
        else:
            _edit_zarr_json(path, pick, lambda m: m.update(shape=[max(0, m["shape"][0] + delta), *m["shape"][1:]]))
        return f"{pick} resized by {delta} rows"
    if kind == "chunk_shape":
        _edit_zarr_json(path, pick, lambda m: m["chunk_grid"]["configuration"].update(
            chunk_shape=[m["chunk_grid"]["configuration"]["chunk_shape"][0] + 1,
                         *m["chunk_grid"]["configuration"]["chunk_shape"][1:]]))
        return f"{pick} chunk shape changed"
    if kind in ("delete_chunk", "truncate_chunk", "extend_chunk", "garble_compressed_chunk"):
        chunks = sorted(p for p in (path / pick).iterdir() if p.name != "zarr.json")
        if kind == "garble_compressed_chunk":
            compressed = [a for a in arrays if len(json.loads((path / a / "zarr.json").read_text())["codecs"]) > 1
                          and any(p.name != "zarr.json" for p in (path / a).iterdir())]
            pick = compressed[int(rng.integers(len(compressed)))]
            chunks = sorted(p for p in (path / pick).iterdir() if p.name != "zarr.json")
        if not chunks:
            return f"{pick} has no chunk"
        chunk = chunks[int(rng.integers(len(chunks)))]
        size = chunk.stat().st_size
        if kind == "delete_chunk":
            chunk.unlink()
        elif kind == "truncate_chunk":
            os.truncate(chunk, int(rng.integers(0, size)))
        elif kind == "extend_chunk":
            with open(chunk, "ab") as fh:
                fh.write(rng.bytes(int(rng.integers(1, 64))))
        else:
            chunk.write_bytes(rng.bytes(size))
        return f"{kind} {chunk.relative_to(path)}"
    if kind == "truncate_file":
        size = path.stat().st_size
        os.truncate(path, int(rng.integers(0, size)))
        return "file truncated"
    if kind == "extend_file":
        with open(path, "ab") as fh:
            fh.write(rng.bytes(int(rng.integers(1, 4096))))
        return "file extended"
    if kind == "delete_dataset":
        with h5py.File(path, "r+") as f:
            del f[pick]
        return f"{pick} deleted"
    raise AssertionError(kind)


def _read_raw(path: Path, suffix: str, row: int, col: int) -> float:
    if suffix == ".h5":
        with h5py.File(path, "r") as f:
            return float(f["instances/features"][row, col])
    return float(zarr.open_array(path / "instances/features", mode="r")[row, col])


@st.composite
def bank_damage(draw):
    suffix = draw(st.sampled_from([".h5", ".zarr"]))
    checksum = draw(st.booleans())
    compression = draw(st.sampled_from([None, "gzip"] if suffix == ".h5" else [None, "blosc-zstd"]))
    kinds = COMMON + (ZARR_ONLY if suffix == ".zarr" else HDF5_ONLY) + (CHECKED_ONLY if checksum else [])
    return suffix, checksum, compression, draw(st.sampled_from(kinds)), draw(st.integers(0, 2**32 - 1))


@FUZZ
@given(case=bank_damage())
def test_damaged_bank_is_refused_or_reads_exactly(case, tmp_path_factory, capsys):
    suffix, checksum, compression, kind, seed = case
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("bank") / f"bank{suffix}"
    bags = _bags(rng)
    _write(path, bags, checksum=checksum, compression=compression, chunk_rows=int(rng.integers(4, 40)))
    what = damage(path, suffix, kind, bags, rng)
    try:
        with open_reader(path) as reader:
            exact = _reads_exactly(reader, bags)
        refused = None
    except UserError as exc:
        refused, exact = str(exc), False
        assert str(path) in refused and "\n" not in refused, (what, refused)
    report = verify_bank(path)
    if exact:
        assert report.ok, (what, report.problems)
    else:
        assert not report.ok, (what, refused)
        if refused is None:  # read as stored: only NaN/Inf in an unchecked bank may get this far
            assert kind == "nonfinite" and not checksum, what
            assert any("NaN/Inf" in p for p in report.problems), (what, report.problems)
        capsys.readouterr()
        assert main(["bank", "verify", str(path)]) == 2, what
        err = capsys.readouterr().err
        assert str(path) in err and report.problems[0].removeprefix(f"{path}: ")[:40] in err, (what, err)


# -- CLAM / TRIDENT import -------------------------------------------------------------------------
FEATURE_DTYPES = ["float32", "float64", "float16", "int32", "int64", "bool", "S4"]


@st.composite
def clam_folder(draw):
    files = draw(st.integers(1, 4))
    specs = []
    for i in range(files):
        specs.append({
            "stem": draw(st.sampled_from([f"slide_{i}", "slide_0"])),
            "suffix": draw(st.sampled_from([".h5", ".h5", ".hdf5"])),
            "n": draw(st.integers(0, 6)),
            "dim": draw(st.sampled_from([DIM, DIM, DIM, 5])),
            "dtype": draw(st.sampled_from(FEATURE_DTYPES[:3] * 3 + FEATURE_DTYPES)),
            "shape": draw(st.sampled_from(["2d"] * 4 + ["3d", "1d", "group"])),
            "nonfinite": draw(st.sampled_from([None] * 6 + ["nan", "inf", "huge"])),
            "coords": draw(st.sampled_from(["ok"] * 5 + ["none", "short", "wide", "float_nan", "strings", "flat"])),
            "attrs": draw(st.sampled_from(["none", "scalars", "odd"])),
            "file": draw(st.sampled_from(["h5"] * 8 + ["garbage", "truncated", "no_features"])),
            "encoder": draw(st.sampled_from([None] * 6 + ["bad_json", "other_dim"])),
        })
    return specs, draw(st.integers(0, 2**32 - 1))


def _clam_file(path: Path, spec: dict, rng: np.random.Generator) -> dict:
    """Write one per-slide file as described; returns what it holds (features, coords, encoder)."""
    n, d = spec["n"], spec["dim"]
    x = (rng.standard_normal((n, d)) * 3).astype(spec["dtype"]) if spec["dtype"] != "S4" else \
        np.array([[b"ab"] * d] * n, dtype="S4").reshape(n, d)
    if spec["nonfinite"] and n and x.dtype.kind == "f":
        x[0, 0] = {"nan": np.nan, "inf": np.inf, "huge": 1e30 if x.dtype != np.float16 else np.inf}[spec["nonfinite"]]
    coords = rng.integers(0, 100_000, (n, 2)).astype(np.int64)
    held = {"x": x, "coords": None, "encoder": None, "readable": spec["file"] == "h5"}
    if spec["file"] == "garbage":
        path.write_bytes(rng.bytes(200))
        return held
    with h5py.File(path, "w") as f:
        if spec["file"] != "no_features":
            if spec["shape"] == "group":
                f.create_group("features").create_dataset("x", data=x)
            else:
                data = {"2d": x, "3d": x[None], "1d": x.reshape(-1)}[spec["shape"]]
                f.create_dataset("features", data=data, chunks=(1, *data.shape[1:]) if data.ndim > 1 and n else None,
                                 maxshape=(None, *data.shape[1:]) if data.ndim > 1 and n else None)
        c = spec["coords"]
        if c != "none":
            held["coords"] = {"ok": coords, "short": coords[:-1], "wide": np.hstack([coords, coords[:, :1]]),
                              "float_nan": np.where(coords > 50_000, np.nan, coords.astype(float)),
                              "strings": np.array([b"x"] * (2 * n), dtype="S1").reshape(n, 2),
                              "flat": coords.reshape(-1)}[c]
            f.create_dataset("coords", data=held["coords"])
            f["coords"].attrs["patch_size"] = 256
        if spec["attrs"] == "scalars":
            f.attrs.update({"magnification": 20, "mpp": 0.5, "name": "s", "ok": True})
        elif spec["attrs"] == "odd":
            f.attrs["vector"] = np.arange(3)
            f.attrs["empty"] = h5py.Empty("f4")
            f.attrs["nested"] = np.array([b"a", b"bc"])
        if spec["encoder"] == "bad_json":
            held["encoder"] = f.attrs["encoder"] = "{not json"
        elif spec["encoder"] == "other_dim":
            held["encoder"] = f.attrs["encoder"] = json.dumps(EncoderInfo("e", "1", "", "t", d + 1).to_dict())
    if spec["file"] == "truncated":
        os.truncate(path, max(1, path.stat().st_size // 3))
    return held


def _importable(files: dict[Path, tuple[dict, dict]]) -> bool:
    """The oracle: whether a correct import accepts this folder (float32 bank, no encoder given)."""
    if len({p.stem for p in files}) < len(files):
        return False  # slide_0.h5 and slide_0.hdf5 would be one bag id
    encoders = [held["encoder"] for _, held in files.values() if held["encoder"]]
    if any(e == "{not json" for e in encoders) or len(set(encoders)) > 1:
        return False
    dims, first_dim = set(), None
    for _, (spec, held) in sorted(files.items()):  # import reads the files in name order
        x, coords, n = held["x"], held["coords"], spec["n"]
        if not held["readable"] or x.dtype.kind not in "fiu" or spec["shape"] == "group":
            return False
        if spec["shape"] == "1d" and n:
            return False
        if x.dtype.kind == "f" and not np.isfinite(x.astype(np.float32)).all():
            return False  # NaN/Inf, or too large for the float32 bank
        if coords is not None and (coords.dtype.kind not in "fiu" or (n and coords.shape != (n, 2))
                                   or (coords.dtype.kind == "f" and not np.isfinite(coords).all())):
            return False
        if n:
            dims.add(spec["dim"])
        if first_dim is None and spec["shape"] != "1d":  # an empty (0, D) file tells D too
            first_dim = spec["dim"]
    if encoders:  # the dimension comes from the stored fingerprint
        return dims <= {json.loads(encoders[0])["dim"]}
    return first_dim is not None and dims <= {first_dim}


@FUZZ
@given(case=clam_folder())
def test_clam_import_is_refused_or_reads_exactly(case, tmp_path_factory):
    specs, seed = case
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp("clam")
    folder, out = root / "h5_files", root / "bank.h5"
    folder.mkdir()
    files = {}
    for spec in specs:
        path = folder / f"{spec['stem']}{spec['suffix']}"
        files[path] = (spec, _clam_file(path, spec, rng))  # a repeated name overwrites the file
    expected = _importable(files)
    try:
        import_clam(root, out, dtype="float32")
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message and str(root) in message, message
        assert not expected, f"refused an importable folder: {message}"
        assert not out.exists(), "a refused import leaves no bank"
        return
    assert expected, f"imported a folder that should be refused: {[s for s, _ in files.values()]}"
    with open_reader(out) as bank:
        assert sorted(bank.bag_ids()) == sorted(p.stem for p in files)
        for path, (spec, held) in files.items():
            x, got = held["x"], bank.read(path.stem)
            assert got.shape == (spec["n"], bank.dim)
            if spec["n"]:
                np.testing.assert_array_equal(got, x.astype(np.float32))
            if held["coords"] is not None and spec["n"]:
                np.testing.assert_array_equal(bank.read_coords(path.stem), np.rint(held["coords"]).astype(np.int32))
            elif spec["n"]:
                assert (bank.read_coords(path.stem) == -1).all()


@pytest.mark.parametrize("kind", ["delete_chunk", "truncate_chunk", "extend_chunk"])
def test_fuzz_damage_kinds_run(tmp_path, kind):
    """The Zarr chunk damages reach a chunk file (a guard on the generator itself)."""
    rng = np.random.default_rng(0)
    bags = _bags(rng)
    path = tmp_path / "bank.zarr"
    _write(path, bags, chunk_rows=8)
    assert "has no chunk" not in damage(path, ".zarr", kind, bags, rng)
