"""Fixtures for the feature-bank tests: a small encoder fingerprint and deterministic bags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from feature_cache.bank import EncoderInfo, open_writer

DIM = 16


@dataclass
class Bag:
    """One bag's inputs as given to ``append``."""

    bag_id: str
    features: np.ndarray  # (n, D) float32
    coords: np.ndarray  # (n, 2)
    meta: dict = field(default_factory=dict)
    cell_type: list[str] | None = None
    cell_id: np.ndarray | None = None  # (n,) str


def make_bags(count: int, seed: int = 0, dim: int = DIM, empty: tuple[int, ...] = (3,)) -> list[Bag]:
    """Bags of heavy-tailed sizes; the bags at positions ``empty`` have zero cells."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(count):
        n = 0 if i in empty else int(rng.integers(1, 60))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        coords = rng.integers(0, 10_000, (n, 2))
        meta = {"site": f"s{i % 3}", "n_detected": n + i, "score": float(i) / 7, "ok": bool(i % 2)}
        kinds = np.array(["blast", "lymphocyte", "neutrophil"])
        # string ids as crop folders give them (file stems), with a non-ASCII one to check UTF-8
        ids = np.array([f"img_{1000 * i + j:05d}" if j % 7 else f"zelle-ä{j}" for j in range(n)], dtype=object)
        bags.append(Bag(f"patient_{seed}_{i:03d}", x, coords, meta, list(kinds[rng.integers(0, 3, n)]), ids))
    return bags


def write_bank(path: Path, bags: list[Bag], info: EncoderInfo, mode: str = "x", **kwargs) -> Path:
    """Write ``bags`` with every column; returns ``path``."""
    with open_writer(path, info, mode, **kwargs) as writer:
        for b in bags:
            writer.append(b.bag_id, b.features, b.coords, cell_id=b.cell_id, cell_type=b.cell_type, meta=b.meta)
    return path


@pytest.fixture
def info() -> EncoderInfo:
    """Fingerprint of a 16-d test encoder."""
    return EncoderInfo(name="toy", version="1.0", weights_sha256="ab" * 32, transform="resize=64", dim=DIM)


@pytest.fixture(params=[".h5", ".zarr"])
def suffix(request: pytest.FixtureRequest) -> str:
    """Both backends."""
    return request.param


@pytest.fixture(name="make_bags")
def _make_bags_fixture():
    """The :func:`make_bags` helper."""
    return make_bags


@pytest.fixture(name="write_bank")
def _write_bank_fixture():
    """The :func:`write_bank` helper."""
    return write_bank
