"""Crop folders on real BCCD crops, including bad and unusual images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources import create_source
from feature_cache.sources.crops import CropFolderSource
from feature_cache.sources.image_io import ImageReadError, crop_centered, read_rgb


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def crop_root(tmp_path: Path, real_crops: list[np.ndarray]) -> Path:
    """p1: 3 good crops + 2 broken files; p2: unusual modes; p3: only an unreadable file."""
    root = tmp_path / "crops"
    p1, p2, p3 = (root / name for name in ("p1", "p2", "p3"))
    for p in (p1, p2, p3):
        p.mkdir(parents=True)
    for i, crop in enumerate(real_crops[:3]):
        Image.fromarray(crop).save(p1 / f"cell_{i}.png")
    jpeg = io.BytesIO()
    Image.fromarray(real_crops[3]).save(jpeg, format="JPEG", quality=90)
    (p1 / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (p1 / "notes.png").write_text("this is not an image")
    (p1 / "readme.txt").write_text("ignored: not an image suffix")
    crop = real_crops[4]
    gray = np.asarray(Image.fromarray(crop).convert("L"))
    (p2 / "gray.png").write_bytes(_png(gray))
    rgba = np.dstack([crop, np.full(crop.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    (p2 / "rgba.png").write_bytes(_png(rgba))
    (p2 / "gray16.png").write_bytes(_png(gray.astype(np.uint16) * 257))
    Image.fromarray(gray.astype(np.uint16) * 257).save(p2 / "gray16.tif")
    Image.fromarray(crop).convert("P").save(p2 / "palette.png")
    Image.fromarray(crop).convert("CMYK").save(p2 / "cmyk.jpg")
    Image.fromarray(gray.astype(np.float32) / 255.0).save(p2 / "float.tiff")
    (p3 / "empty.PNG").write_bytes(b"")
    (root / ".hidden").mkdir()
    (root / "no_images").mkdir()
    return root


def test_bags_are_patient_folders_with_images(crop_root: Path) -> None:
    src = create_source("crops", crop_root)
    assert isinstance(src, CropFolderSource)
    assert src.bag_ids() == ["p1", "p2", "p3"]


def test_good_crops_are_read_pixel_exact(crop_root: Path, real_crops: list[np.ndarray]) -> None:
    src = create_source("crops", crop_root)
    batch = src.read_bag("p1")
    assert batch.cell_ids == ["cell_0", "cell_1", "cell_2"]
    assert isinstance(batch.pixels, np.ndarray) and batch.pixels.dtype == np.uint8
    for got, want in zip(batch.pixels, real_crops[:3], strict=True):
        np.testing.assert_array_equal(got, want)
    assert batch.coords.tolist() == [[-1, -1]] * 3 and batch.cell_types == [None] * 3


def test_unreadable_files_are_skipped_counted_and_named(crop_root: Path) -> None:
    src = create_source("crops", crop_root)
    batch = src.read_bag("p1")
    assert len(batch) == 3
    named = {Path(f.path).name: f.reason for f in batch.failures}
    assert set(named) == {"truncated.jpg", "notes.png"}
    assert "cannot decode" in named["truncated.jpg"] and "not an image" in named["notes.png"]
    assert all(f.bag_id == "p1" for f in batch.failures)
    empty = src.read_bag("p3")
    assert len(empty) == 0 and [Path(f.path).name for f in empty.failures] == ["empty.PNG"]
    assert len(src.failures) == 3


def test_unusual_modes_become_rgb_uint8(crop_root: Path, real_crops: list[np.ndarray]) -> None:
    src = create_source("crops", crop_root)
    batch = src.read_bag("p2")
    assert sorted(batch.cell_ids) == sorted(["cmyk", "float", "gray", "gray16.png", "gray16.tif", "palette", "rgba"])
    assert batch.failures == ()
    cells = {c.cell_id: c.pixels for c in batch}
    for pixels in cells.values():
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    gray = np.asarray(Image.fromarray(real_crops[4]).convert("L"))
    for name in ("gray", "gray16.png", "gray16.tif"):
        np.testing.assert_array_equal(cells[name][..., 0], gray)  # 16-bit scaled back exactly
        np.testing.assert_array_equal(cells[name][..., 0], cells[name][..., 2])
    assert np.abs(cells["float"][..., 0].astype(int) - gray).max() <= 1
    assert (cells["rgba"][:10, :10] == 255).all()
    np.testing.assert_array_equal(cells["rgba"][10:, 10:], real_crops[4][10:, 10:])
    assert np.abs(cells["cmyk"].astype(int) - real_crops[4]).mean() < 8  # lossy JPEG round trip


def test_cell_table_adds_coords_and_types(crop_root: Path) -> None:
    (crop_root / "cells.csv").write_text(
        "patient_id,cell_id,cell_type,is_diagnostic,x,y\np1,cell_1,blast,1,120,340\np1,cell_2,,0,,\n"
    )
    batch = create_source("crops", crop_root).read_bag("p1")
    assert batch.coords.tolist() == [[-1, -1], [120, 340], [-1, -1]]
    assert batch.cell_types == [None, "blast", None]
    ignored = create_source("crops", crop_root, cell_table=False).read_bag("p1")
    assert ignored.cell_types == [None] * 3


def test_bad_cell_table_and_paths_are_user_errors(crop_root: Path, tmp_path: Path) -> None:
    (crop_root / "cells.csv").write_text("who,what\n1,2\n")
    with pytest.raises(UserError, match=r"cells\.csv: needs columns patient_id"):
        create_source("crops", crop_root).read_bag("p1")
    with pytest.raises(UserError, match="crop folder not found"):
        create_source("crops", tmp_path / "missing")
    (tmp_path / "empty_root" / "p").mkdir(parents=True)
    with pytest.raises(UserError, match="no patient folder"):
        create_source("crops", tmp_path / "empty_root")
    with pytest.raises(InvalidArgumentError, match="no bag 'p9'"):
        create_source("crops", crop_root.parent / "crops", cell_table=False).files("p9")


def test_read_rgb_errors_and_crop_centered(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_rgb(tmp_path / "missing.png")
    img = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = crop_centered(img, 0, 0, 4, fill=np.array([1, 2, 3]))
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[2:, 2:], img[:2, :2])
    assert (out[0, 0] == [1, 2, 3]).all()
    np.testing.assert_array_equal(crop_centered(img, 3, 2, 2), img[1:3, 2:4])
