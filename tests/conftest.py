"""Shared fixtures: paths to ../shared/data (skip with a reason where absent), small helpers."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MILCORE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_path(name: str) -> Path:
    """Path of ``../shared/data/<name>``; skips the calling test with a clear reason where absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data '{name}' not found at {path} (../shared/data is absent on this machine)")
    return path


@pytest.fixture(scope="module")
def load_benchmark():
    """Import ``benchmarks/<name>.py`` as module ``name`` (registered in ``sys.modules`` while the test module
    runs: dataclasses and patches look it up there); ``load_benchmark(name)`` returns the module."""
    loaded: list[str] = []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None, name
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    """Real BCCD smear fields with Pascal-VOC boxes."""
    return shared_path("bccd")


@pytest.fixture(scope="session")
def bloodmnist_npz() -> Path:
    """Real BloodMNIST single-cell images (npz with official splits)."""
    return shared_path("bloodmnist") / "bloodmnist.npz"


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """Tiny real-format slide files read through OpenSlide."""
    return shared_path("openslide-fixtures")


# a few BCCD fields: one WBC box each, BloodImage_00010 has two (a neutrophil and an eosinophil)
FIELD_IDS = ("BloodImage_00000", "BloodImage_00010", "BloodImage_00100", "BloodImage_00200")


@pytest.fixture(scope="session")
def bccd_small(bccd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VOC-layout folder holding four real BCCD fields and their annotations."""
    root = tmp_path_factory.mktemp("bccd_small")
    (root / "JPEGImages").mkdir()
    (root / "Annotations").mkdir()
    for stem in FIELD_IDS:
        shutil.copy(bccd_dir / "JPEGImages" / f"{stem}.jpg", root / "JPEGImages")
        shutil.copy(bccd_dir / "Annotations" / f"{stem}.xml", root / "Annotations")
    return root


#: Test folders of small-tensor torch code that run with one intra-op thread.
ONE_THREAD_DIRS = ("models", "ops")


@pytest.fixture(autouse=True, scope="module")
def one_thread_for_small_tensors(request: pytest.FixtureRequest):
    """One intra-op thread for the aggregator and segment-op tests (module fixtures included).

    Their tensors are small: on a shared 2-core machine two threads make every small op wait at an
    OpenMP barrier for a descheduled peer (a 2 s test took 50 s under load); one thread is steadier.
    """
    if Path(str(request.node.path)).parent.name not in ONE_THREAD_DIRS:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_planted_bank(folder: Path, n_bags: int = 30, dim: int = 8, seed: int = 0, encoder: str = "toy",
                      sizes: tuple[int, int] = (30, 80)) -> dict:  # fmt: skip
    """Write bank.h5 / cohort.csv / cells.csv where 'sick' bags hold ~8% cells shifted on feature 0.

    Args:
        folder: where to write (created).
        n_bags: bags, alternating control / sick.
        dim: feature dimension.
        seed: random seed.
        encoder: the encoder name of the bank's fingerprint (another name makes an incompatible bank).
        sizes: range of cells per bag (``[low, high)``).

    Returns:
        Paths ``bank``, ``cohort`` (patient_id, dx, sex, age) and ``cells`` (instance ground truth).
    """
    from feature_cache.bank import EncoderInfo, open_writer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = EncoderInfo(name=encoder, version="1", weights_sha256="", transform="none", dim=dim)
    rows, cells = [], []
    with open_writer(folder / "bank.h5", info, mode="w") as w:
        for i in range(n_bags):
            label = i % 2
            n = int(rng.integers(*sizes))
            x = rng.normal(size=(n, dim)).astype(np.float32)  # (n, D)
            diag = np.zeros(n, dtype=bool)
            if label:
                k = max(2, n // 12)
                diag[:k] = True
                x[:k, 0] += 5.0
            perm = rng.permutation(n)
            x, diag = x[perm], diag[perm]
            bag = f"p{i:03d}"
            w.append(bag, x, cell_id=np.arange(n))
            rows.append([bag, ["control", "sick"][label], "F" if i % 4 < 2 else "M", 30 + i])
            cells += [[bag, j, int(diag[j])] for j in range(n)]
    with open(folder / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient_id", "dx", "sex", "age"], *rows])
    with open(folder / "cells.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient_id", "cell_id", "is_diagnostic"], *cells])
    return {"bank": folder / "bank.h5", "cohort": folder / "cohort.csv", "cells": folder / "cells.csv"}


@pytest.fixture(scope="session")
def planted_factory():
    """The planted-bank builder, for tests that need a bank of their own."""
    return make_planted_bank


@pytest.fixture(scope="session", autouse=True)
def passports_meet_their_schema(tmp_path_factory: pytest.TempPathFactory):
    """Every ``passport.json`` a test writes under this session's temporary folders meets
    ``docs/passport.schema.json`` (checked once, when the session ends; issue 16)."""
    yield
    schema = REPO_ROOT / "docs" / "passport.schema.json"
    written = list(tmp_path_factory.getbasetemp().rglob("passport.json"))
    if not written or not schema.exists():
        return
    import json

    from milcore.trust.passport import load_schema, schema_errors

    rules = load_schema(schema)
    bad = {str(p): errors[:3] for p in written if (errors := schema_errors(json.loads(p.read_text()), rules))}
    assert not bad, f"{len(bad)} of {len(written)} passports break docs/passport.schema.json: {bad}"
