"""Field images: detected (or annotated) cells cropped around their centres, on real BCCD fields."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources import create_source
from feature_cache.sources.detect import detect_wbc
from feature_cache.sources.fields import FieldSource, default_crop_size
from feature_cache.sources.image_io import crop_centered, read_rgb
from feature_cache.sources.voc import read_voc


def test_voc_layout_bags_are_image_stems(bccd_small: Path) -> None:
    src = create_source("fields", bccd_small)
    assert isinstance(src, FieldSource)
    assert src.bag_ids() == ["BloodImage_00000", "BloodImage_00010", "BloodImage_00100", "BloodImage_00200"]
    assert src.crop_size == default_crop_size("wbc", 100.0) == 240


def test_wbc_crops_are_centred_on_detections(bccd_small: Path) -> None:
    src = create_source("fields", bccd_small, crop_size=200)
    for bag in src.bag_ids():
        rgb = read_rgb(src.image_path(bag))
        batch = src.read_bag(bag)
        det = detect_wbc(rgb)
        assert len(batch) == len(det) >= 1
        assert isinstance(batch.pixels, np.ndarray) and batch.pixels.shape[1:] == (200, 200, 3)
        boxes = read_voc(bccd_small / "Annotations" / f"{bag}.xml").of("WBC")
        for cell, (x, y) in zip(batch, batch.coords, strict=True):
            assert any(b.contains(x, y) for b in boxes)
            inside = crop_centered(rgb, x, y, 200)
            ok = (inside != 255).any(axis=2)  # compare where the crop is inside the image
            np.testing.assert_array_equal(cell.pixels[ok], inside[ok])
        assert batch.cell_ids == [f"wbc{i:04d}" for i in range(len(batch))]
        assert batch.cell_types == [None] * len(batch)


def test_rbc_cells_and_voc_boxes(bccd_small: Path) -> None:
    rbc = create_source("fields", bccd_small, cells="rbc").read_bag("BloodImage_00100")
    assert 8 <= len(rbc) <= 40 and rbc.pixels.shape[1:] == (140, 140, 3)
    assert rbc.cell_ids[0] == "rbc0000"
    voc = create_source("fields", bccd_small, boxes="voc").read_bag("BloodImage_00010")
    assert voc.cell_types == ["WBC"] * len(voc) and len(voc) == 2
    ys = voc.coords[:, 1]
    assert (np.diff(ys) >= 0).all()  # raster order


def test_detector_options_and_scale(bccd_small: Path) -> None:
    strict = create_source("fields", bccd_small, detector={"min_nucleus_frac": 5.0})
    assert len(strict.read_bag("BloodImage_00000")) == 0
    half = create_source("fields", bccd_small, rbc_diameter_px=50)
    assert half.crop_size == 120 and half.config.rbc_diameter_px == 50
    assert half.describe()["detector"]["rbc_diameter_px"] == 50


def test_folder_of_images_single_file_and_bad_images(bccd_small: Path, tmp_path: Path) -> None:
    folder = tmp_path / "fields"
    folder.mkdir()
    shutil.copy(bccd_small / "JPEGImages" / "BloodImage_00000.jpg", folder / "a.jpg")
    rgb = read_rgb(bccd_small / "JPEGImages" / "BloodImage_00100.jpg")
    Image.fromarray(rgb).save(folder / "b.tif")  # TIFF field
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(folder / "c.png")  # RGBA
    (folder / "d.jpg").write_bytes((bccd_small / "JPEGImages" / "BloodImage_00200.jpg").read_bytes()[:3000])
    src = create_source("fields", folder)
    assert src.bag_ids() == ["a", "b", "c", "d"]
    counts = {bag: len(src.read_bag(bag)) for bag in src.bag_ids()}
    assert counts == {"a": 1, "b": 1, "c": 1, "d": 0}
    assert [Path(f.path).name for f in src.failures] == ["d.jpg"]
    np.testing.assert_array_equal(src.read_bag("b").coords, src.read_bag("c").coords)
    single = create_source("fields", folder / "a.jpg")
    assert single.bag_ids() == ["a"] and len(single.read_bag("a")) == 1
    no_voc = create_source("fields", folder, boxes="voc")
    assert len(no_voc.read_bag("a")) == 0 and "no VOC annotation" in no_voc.failures[0].reason


def test_field_errors(tmp_path: Path, bccd_small: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        create_source("fields", tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a field image"):
        create_source("fields", tmp_path / "notes.txt")
    with pytest.raises(UserError, match="no field images"):
        create_source("fields", tmp_path)
    shutil.copy(bccd_small / "JPEGImages" / "BloodImage_00000.jpg", tmp_path / "x.jpg")
    Image.open(tmp_path / "x.jpg").save(tmp_path / "x.png")
    with pytest.raises(UserError, match="same bag id"):
        create_source("fields", tmp_path)
    with pytest.raises(InvalidArgumentError, match="cells must be one of"):
        create_source("fields", bccd_small, cells="platelets")
    with pytest.raises(InvalidArgumentError, match="boxes must be"):
        create_source("fields", bccd_small, boxes="coco")
    with pytest.raises(InvalidArgumentError, match="unknown detector option"):
        create_source("fields", bccd_small, detector={"threshold": 1})
