"""Fixtures for the source tests: small real inputs cut from BCCD (VOC layout, crop folders)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

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


@pytest.fixture(scope="session")
def bccd_field(bccd_dir: Path) -> np.ndarray:
    """BloodImage_00000 as (480, 640, 3) uint8."""
    from feature_cache.sources.image_io import read_rgb

    return read_rgb(bccd_dir / "JPEGImages" / "BloodImage_00000.jpg")


@pytest.fixture(scope="session")
def real_crops(bccd_small: Path) -> list[np.ndarray]:
    """Real 96 x 96 cell crops: the annotated WBC and RBC boxes of the small BCCD folder."""
    from feature_cache.sources.fields import FieldSource

    crops: list[np.ndarray] = []
    for cells in ("wbc", "rbc"):
        src = FieldSource(bccd_small, cells=cells, boxes="voc", crop_size=96)
        for bag in src.bag_ids():
            crops.extend(c.pixels for c in src.iter_cells(bag))
    return crops
