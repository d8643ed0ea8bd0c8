"""Bags of real blood cells from BloodMNIST (MedMNIST v2; cells from the PBC dataset, Acevedo et al. 2020).

BloodMNIST has no patients and no diagnoses, only single healthy-donor cells of 8 types, so bags are
synthetic: a *positive* bag holds a small fraction (default 2-10%) of one witness type (immature
granulocytes, a left-shift proxy) among normal leukocytes, a *negative* bag holds none. Each
official split builds its own bags (train, val and test images are never mixed), with cell-level
ground truth. Such labels test MIL machinery on real pixels; they are not a clinical result.

:func:`make_bloodmnist_bags` writes ``cohort.csv`` / ``cells.csv`` / ``bags.json``; the
``bloodmnist`` source (``create_source("bloodmnist", FOLDER)``) then yields the 28 x 28 crops.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.config import Config, option
from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources.base import UNKNOWN_COORD, BagOrigin, BagSource, Cell, digest, file_stamp

CELL_TYPES = ("basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte", "monocyte",
              "neutrophil", "platelet")  # fmt: skip
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class BloodMnistBags(Config):
    """How bags are built from one split.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        bags: number of bags (half positive, rounded down).
        witness: cell type whose presence makes a bag positive.
        witness_range: fraction of witness cells in a positive bag (uniform).
        bag_range: cells per bag (log-uniform).
        background: normal cell types filling every bag (uniformly over their images).
        seed: random seed.
        prefix: bag-id prefix.
    """

    config_key = "BloodMNIST bag option"

    split: str = option("train", choices=SPLITS)
    bags: int = option(60, low=2)
    witness: str = option("immature_granulocyte", choices=CELL_TYPES)
    witness_range: tuple[float, float] = option((0.02, 0.10), low=0, high=1, low_open=True, high_open=True)
    bag_range: tuple[int, int] = option((50, 400), low=1)
    background: tuple[str, ...] = option(("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"),
                                         choices=CELL_TYPES, min_items=1)  # fmt: skip
    seed: int = option(0, low=0)
    prefix: str = "bm"

    def validate(self) -> None:
        """The witness is not a background type; ranges are ordered."""
        if self.witness in self.background:
            raise InvalidArgumentError("the witness type cannot also be a background type")
        if self.witness_range[0] > self.witness_range[1]:
            raise InvalidArgumentError(f"witness_range must be low <= high, got {list(self.witness_range)}")
        if self.bag_range[0] > self.bag_range[1]:
            raise InvalidArgumentError(f"bag_range must be low <= high, got {list(self.bag_range)}")


def load_split(npz: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 28, 28, 3) uint8, labels (n,) int)`` of one official split."""
    path = Path(npz)
    if not path.exists():
        raise UserError(f"{path}: BloodMNIST file not found")
    try:
        with np.load(path) as data:
            return data[f"{split}_images"], data[f"{split}_labels"].reshape(-1).astype(np.int64)
    except (KeyError, ValueError, OSError) as exc:
        raise UserError(f"{path}: not a BloodMNIST npz ({exc})") from exc


def make_bloodmnist_bags(npz: str | Path, out: str | Path, config: BloodMnistBags) -> Path:
    """Build bags from one split and write ``cohort.csv``, ``cells.csv`` and ``bags.json`` into ``out``."""
    _, labels = load_split(npz, config.split)
    rng = np.random.default_rng([config.seed, SPLITS.index(config.split)])
    by_type = {t: np.flatnonzero(labels == CELL_TYPES.index(t)) for t in CELL_TYPES}
    background = np.concatenate([by_type[t] for t in config.background])
    witnesses = by_type[config.witness]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = config.bag_range
    sizes = np.exp(rng.uniform(np.log(lo), np.log(hi), config.bags)).round().astype(int)
    positive = np.zeros(config.bags, dtype=bool)
    positive[rng.permutation(config.bags)[: config.bags // 2]] = True
    bags: dict[str, list[int]] = {}
    diagnostic: dict[str, list[bool]] = {}
    for i in range(config.bags):
        n = int(sizes[i])
        k = max(1, round(rng.uniform(*config.witness_range) * n)) if positive[i] else 0
        chosen = np.concatenate([rng.choice(witnesses, k, replace=False),
                                 rng.choice(background, n - k, replace=n - k > len(background))])  # fmt: skip
        order = rng.permutation(n)
        bag = f"{config.prefix}-{config.split}-{i:04d}"
        bags[bag] = [int(v) for v in chosen[order]]
        diagnostic[bag] = [bool(v) for v in (np.arange(n) < k)[order]]
    with open(out / "cohort.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "left_shift", "split", "n_cells", "n_diagnostic"])
        for i, (bag, idx) in enumerate(bags.items()):
            w.writerow([bag, "positive" if positive[i] else "control", config.split, len(idx), sum(diagnostic[bag])])
    with open(out / "cells.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "cell_id", "cell_type", "is_diagnostic", "source_index"])
        for bag, idx in bags.items():
            for j, (src, diag) in enumerate(zip(idx, diagnostic[bag], strict=True)):
                w.writerow([bag, f"c{j:04d}", CELL_TYPES[labels[src]], int(diag), src])
    meta = {"format": "milcore-bloodmnist-bags", "npz": str(Path(npz).resolve()), "config": asdict(config),
            "bags": bags}  # fmt: skip
    (out / "bags.json").write_text(json.dumps(meta))
    return out


class BloodMnistSource(BagSource):
    """The cells of bags written by :func:`make_bloodmnist_bags` (28 x 28 RGB crops).

    Args:
        path: folder holding ``bags.json``.
        npz: BloodMNIST file (default: the one recorded in ``bags.json``).
    """

    kind = "bloodmnist"

    def __init__(self, path: str | Path, npz: str | Path | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        meta_path = self.path / "bags.json"
        if not meta_path.exists():
            raise UserError(f"{self.path}: no bags.json (build bags with make_bloodmnist_bags first)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "milcore-bloodmnist-bags":
            raise UserError(f"{meta_path}: not a BloodMNIST bag file")
        self.npz = Path(npz or meta["npz"])
        self.split = meta["config"]["split"]
        self.bags: dict[str, list[int]] = meta["bags"]
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = state["_labels"] = None
        return state

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None or self._labels is None:
            self._images, self._labels = load_split(self.npz, self.split)
        return self._images, self._labels

    def bag_ids(self) -> list[str]:
        """Bag ids, sorted."""
        return sorted(self.bags)

    def iter_cells(self, bag_id: str) -> Iterator[Cell]:
        """The bag's crops in ``cells.csv`` order."""
        if bag_id not in self.bags:
            raise self._unknown_bag(bag_id)
        images, labels = self._data()
        for j, src in enumerate(self.bags[bag_id]):
            yield Cell(images[src], (UNKNOWN_COORD, UNKNOWN_COORD), f"c{j:04d}", CELL_TYPES[labels[src]])

    def origin(self, bag_id: str) -> BagOrigin:
        """The BloodMNIST file by name, size and mtime, and the bag's image indices."""
        if bag_id not in self.bags:
            raise self._unknown_bag(bag_id)
        idx = self.bags[bag_id]
        stamp = file_stamp(self.npz) if self.npz.exists() else None
        settings = json.dumps({"split": self.split}, sort_keys=True)
        return BagOrigin(self.kind, str(self.path.resolve()), len(idx), settings, digest(stamp, self.split, idx),
                         unit="cells")  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """Kind, folder and split."""
        return {"kind": self.kind, "path": str(self.path), "npz": str(self.npz), "split": self.split}


def _register() -> None:
    from feature_cache.sources.registry import register_source

    register_source("bloodmnist", BloodMnistSource)


_register()
