"""The source contract, checked for every registered source (timm style: registered -> tested).

Each built-in kind reads a tiny drawn input written here (crop folders, smear fields and a pyramidal
TIFF of drawn cells, a synthetic cohort, a BloodMNIST-format npz), so the contract runs without
``../shared``; the real-data behaviour of each source is tested in its own file. A kind with no example
input here (a plug-in) is skipped with the reason. :func:`check_source` is reused by the plug-in tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_cache.errors import InvalidArgumentError
from feature_cache.sources import BagSource, Cell, CellBatch, SourceFailure, create_source, list_sources
from feature_cache.sources.base import BagOrigin


def drawn_field(seed: int, width: int = 640, height: int = 480) -> np.ndarray:
    """A smear field of drawn cells: ~25 red cells and 2 white cells (purple nucleus), blurred, noisy."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (232, 222, 226))
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(35, 45)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(222, 150, 160))
    for _ in range(2):
        x, y = rng.uniform(100, width - 100), rng.uniform(100, height - 100)
        draw.ellipse([x - 50, y - 50, x + 50, y + 50], fill=(205, 175, 210))
        draw.ellipse([x - 30, y - 25, x + 30, y + 25], fill=(90, 40, 130))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(2))).astype(np.float32)
    return np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)


def drawn_cell(size: int, seed: int) -> np.ndarray:
    """One (size, size, 3) uint8 drawn cell crop: cytoplasm disc, off-centre nucleus, noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (232, 222, 226))
    draw = ImageDraw.Draw(img)
    draw.ellipse([1, 1, size - 2, size - 2], fill=(205, 175, 210))
    r, (x, y) = rng.uniform(0.2, 0.35) * size, rng.uniform(0.4, 0.6, 2) * size
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(90, 40, 130))
    pixels = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _crops(folder: Path) -> tuple[Path, dict[str, Any]]:
    from PIL import Image

    for p, patient in enumerate(("p1", "p2")):
        (folder / patient).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(drawn_cell(24 + 4 * i, 10 * p + i)).save(folder / patient / f"cell{i}.png")
    return folder, {}


def _fields(folder: Path) -> tuple[Path, dict[str, Any]]:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(drawn_field(i)).save(folder / f"field{i}.png")
    return folder, {}


def _slides(folder: Path) -> tuple[Path, dict[str, Any]]:
    pytest.importorskip("openslide", reason="the slides source reads through OpenSlide, not installed here")
    from feature_cache.sources.pyramid_tiff import write_pyramidal_tiff

    folder.mkdir(parents=True)
    write_pyramidal_tiff(folder / "slide.tif", np.concatenate([drawn_field(0), drawn_field(1)], axis=1), tile=256,
                         mpp=0.075)  # fmt: skip
    return folder, {}


def _synthetic(folder: Path) -> tuple[Path, dict[str, Any]]:
    from feature_cache.sources.synthetic import SynthConfig, write_cohort

    write_cohort(SynthConfig(task="aml", patients=2, seed=0, bag_median=6, bag_range=(4, 8)), folder)
    return folder, {}


def _bloodmnist(folder: Path) -> tuple[Path, dict[str, Any]]:
    from feature_cache.sources.bloodmnist import CELL_TYPES, BloodMnistBags, make_bloodmnist_bags

    folder.mkdir(parents=True)
    labels = np.repeat(np.arange(len(CELL_TYPES)), 4)[:, None]  # (32, 1), the npz layout of MedMNIST
    images = np.stack([drawn_cell(28, i) for i in range(len(labels))])  # (32, 28, 28, 3)
    npz = folder / "bloodmnist.npz"
    np.savez(npz, **{f"{s}_{k}": v for s in ("train", "val", "test") for k, v in
                     (("images", images), ("labels", labels))})  # fmt: skip
    config = BloodMnistBags(split="test", bags=2, bag_range=(5, 8), witness_range=(0.1, 0.3))
    return make_bloodmnist_bags(npz, folder / "bags", config), {}


#: source kind -> writer of a tiny example input into a folder (path and options to build it with)
EXAMPLES: dict[str, Callable[[Path], tuple[Path, dict[str, Any]]]] = {
    "bloodmnist": _bloodmnist,
    "crops": _crops,
    "fields": _fields,
    "slides": _slides,
    "synthetic": _synthetic,
}


def check_source(source: BagSource, kind: str) -> None:
    """The contract every source honours: ids, whole bags, cells, failures, origin and description."""
    assert isinstance(source, BagSource) and source.kind == kind
    ids = source.bag_ids()
    assert ids and all(isinstance(b, str) for b in ids), f"{kind}: bag_ids() must be non-empty strings"
    assert ids == sorted(set(ids)) and source.bag_ids() == ids, f"{kind}: bag ids sorted, unique, stable"
    for bag in ids[:2]:
        batch = source.read_bag(bag)
        n = len(batch)
        assert isinstance(batch, CellBatch) and n >= 1, f"{kind}: bag {bag!r} read no cell"
        for i in range(n):
            crop = batch.pixels[i]
            assert crop.ndim == 3 and crop.shape[2] == 3 and crop.dtype == np.uint8 and min(crop.shape[:2]) >= 1
        if isinstance(batch.pixels, np.ndarray):
            assert batch.pixels.shape[0] == n and batch.pixels.dtype == np.uint8
        assert batch.coords.shape == (n, 2) and batch.coords.dtype == np.int64
        assert len(batch.cell_ids) == len(set(batch.cell_ids)) == n and all(isinstance(c, str) for c in batch.cell_ids)
        assert len(batch.cell_types) == n and all(t is None or isinstance(t, str) for t in batch.cell_types)
        assert all(isinstance(f, SourceFailure) for f in batch.failures)
        cells = list(source.iter_cells(bag))  # the same cells, in the same order
        assert all(isinstance(c, Cell) for c in cells) and [c.cell_id for c in cells] == batch.cell_ids
        again = source.read_bag(bag)
        assert again.cell_ids == batch.cell_ids, f"{kind}: not deterministic"
        assert np.array_equal(again.coords, batch.coords), f"{kind}: not deterministic"
        origin = source.origin(bag)
        assert isinstance(origin, BagOrigin) and origin.kind == kind and len(origin.digest) == 64
        assert origin.difference(source.origin(bag)) is None, f"{kind}: origin of {bag!r} is not stable"
        json.loads(origin.settings)
    if len(ids) > 1:
        assert source.origin(ids[0]).digest != source.origin(ids[1]).digest, f"{kind}: two bags, one fingerprint"
    description = source.describe()
    assert isinstance(description, dict) and description.get("kind") == kind
    json.dumps(description, default=str)
    with pytest.raises(InvalidArgumentError, match="no bag"):
        list(source.iter_cells("no-such-bag-\u00e9"))


@pytest.mark.parametrize("kind", list_sources())
def test_source_contract(kind: str, tmp_path: Path) -> None:
    if kind not in EXAMPLES:
        pytest.skip(f"no example input for source {kind!r} in tests/sources/test_source_contract.py EXAMPLES")
    path, options = EXAMPLES[kind](tmp_path / kind)
    check_source(create_source(kind, path, **options), kind)



class _Broken(BagSource):
    """A crops source with one defect switched on by ``defect``."""

    kind = "broken"

    def __init__(self, path: str | Path, defect: str = "") -> None:
        super().__init__()
        self.path, self.defect, self.calls = Path(path), defect, 0

    def bag_ids(self) -> list[str]:
        return ["b", "a"] if self.defect == "unsorted" else ["a", "b"]

    def iter_cells(self, bag_id: str):
        if bag_id not in ("a", "b"):
            raise self._unknown_bag(bag_id)
        dtype = np.float32 if self.defect == "float" else np.uint8
        for i in range(2):
            yield Cell(np.zeros((4, 4, 3), dtype), (i, i), f"c{i}")

    def describe(self) -> dict[str, Any]:
        self.calls += 1
        extra = {"call": self.calls} if self.defect == "unstable" else {}
        return {"kind": self.kind, "path": str(self.path), **extra}


@pytest.mark.parametrize("defect", ["unsorted", "float", "unstable"])
def test_check_source_catches_a_broken_source(defect: str, tmp_path: Path) -> None:
    check_source(_Broken(tmp_path), "broken")  # the healthy version passes
    with pytest.raises(AssertionError):
        check_source(_Broken(tmp_path, defect), "broken")
