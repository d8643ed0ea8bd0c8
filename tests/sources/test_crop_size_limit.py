"""Oversized images in a crop folder stop the run by name, from the header (issue 13, item 12)."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_cache.errors import InvalidArgumentError
from feature_cache.sources import create_source
from feature_cache.sources.base import InputRefusedError
from feature_cache.sources.crops import MAX_CROP_PIXELS
from feature_cache.sources.image_io import ImageTooLargeError, read_rgb
from feature_cache.sources.synthetic import SynthConfig, write_cohort
from milcore.cli import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bigcrop") / "cohort"
    write_cohort(SynthConfig(task="aml", patients=2, seed=3, bag_median=12, bag_range=(10, 20)), out)
    return out


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10,000 x 10,000 PNG (a few hundred KB on disk, 300 MB decoded; above PIL's bomb-warning limit)."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("RGB", (10_000, 10_000), (200, 180, 190)).save(path, compress_level=1)
    return path


def _with(cohort: Path, tmp_path: Path, image: Path, bag: str = "aml-0002") -> tuple[Path, Path]:
    folder = tmp_path / "crops"
    shutil.copytree(cohort, folder)
    target = folder / bag / f"zz_{image.name}"
    shutil.copy(image, target)
    return folder, target


def test_huge_crop_is_refused_by_name_without_decoding(cohort: Path, huge_png: Path, tmp_path: Path, capsys) -> None:
    folder, target = _with(cohort, tmp_path, huge_png, bag="aml-0001")
    out = tmp_path / "out"
    out.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not leak
        code = main(["extract", "--source", "crops", "--input", str(folder), "--encoder", "toy", "--out",
                     str(out / "bank.h5"), "--workers", "0", "-q"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DecompressionBomb" not in err, err
    assert f"{target}: too large for a single-cell crop (10000 x 10000 = 100000000 pixels" in err
    assert "--max-crop-pixels" in err
    assert sorted(p.name for p in out.iterdir()) == [], "the failing bag was the first one written: nothing kept"


def test_the_limit_is_read_from_the_header(huge_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self, *a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(ImageTooLargeError, match=r"10000 x 10000 = 100000000 pixels, above the limit of 1048576"):
        read_rgb(huge_png, max_pixels=MAX_CROP_PIXELS)


def test_the_option_raises_the_limit(cohort: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.fromarray(np.full((1100, 1000, 3), 180, np.uint8)).save(big)  # 1.1 M pixels: above the default
    folder, target = _with(cohort, tmp_path, big)
    source = create_source("crops", folder)
    with pytest.raises(InputRefusedError, match=r"zz_big.png: too large for a single-cell crop \(1000 x 1100"):
        source.read_bag("aml-0002")
    raised = create_source("crops", folder, max_crop_pixels=2_000_000)
    assert target.stem in raised.read_bag("aml-0002").cell_ids
    code = main(["extract", "--source", "crops", "--input", str(folder), "--encoder", "toy", "--out",
                 str(tmp_path / "b.h5"), "--workers", "0", "-q", "--max-crop-pixels", "2000000"])  # fmt: skip
    assert code == 0


@pytest.mark.parametrize("value", [0, -1, 2.5, "big", True, 10**12])
def test_bad_limits_are_refused(cohort: Path, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match="max_crop_pixels must be a whole number between 1 and"):
        create_source("crops", cohort, max_crop_pixels=value)


def test_max_crop_pixels_only_for_crops(cohort: Path, tmp_path: Path, capsys) -> None:
    code = main(["extract", "--source", "synthetic", "--input", str(cohort), "--encoder", "toy", "--out",
                 str(tmp_path / "b.h5"), "--max-crop-pixels", "10"])  # fmt: skip
    assert code == 2 and "--max-crop-pixels applies to the crops source" in capsys.readouterr().err
    assert not (tmp_path / "b.h5").exists()


def test_large_field_images_are_logged_by_name_not_warned_raw(
    huge_png: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000_000)  # keep the test's decode small
    small_field = huge_png.with_name("field.png")
    Image.new("RGB", (4000, 3000), (200, 180, 190)).save(small_field, compress_level=1)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        rgb = read_rgb(small_field)  # 12 M pixels: above PIL's (lowered) limit, below twice it
    assert rgb.shape == (3000, 4000, 3)
    assert f"{small_field}: decoding a large image (4000 x 3000" in caplog.text
    with pytest.raises(ImageTooLargeError, match="image too large for PIL to decode"):
        read_rgb(huge_png)  # 100 M pixels: above twice the limit, refused by PIL (no decoding)
