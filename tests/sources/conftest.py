"""Fixtures for the source tests: small real inputs cut from BCCD (VOC layout, crop folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


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
