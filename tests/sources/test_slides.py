"""Whole slides through OpenSlide: the real-format fixtures and pyramidal TIFFs written from BCCD fields."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources import create_source
from feature_cache.sources.detect import Detections
from feature_cache.sources.image_io import read_rgb
from feature_cache.sources.pyramid_tiff import write_pyramidal_tiff
from feature_cache.sources.slide_io import open_slide, read_rgb_region, smear_mask
from feature_cache.sources.slide_tiles import core_bounds, merge_close, tile_starts
from feature_cache.sources.slides import SlideSource

MOSAIC = ("BloodImage_00000", "BloodImage_00010", "BloodImage_00100", "BloodImage_00200")
BCCD_MPP = 0.075  # a red cell (7.5 µm) spans ~100 px in BCCD fields


@pytest.fixture(scope="module")
def mosaic_tiff(bccd_small: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 1280 x 960 pyramidal TIFF made of four real BCCD fields (2 x 2), and its pixels."""
    ims = [read_rgb(bccd_small / "JPEGImages" / f"{s}.jpg") for s in MOSAIC]
    mosaic = np.concatenate([np.concatenate(ims[:2], axis=1), np.concatenate(ims[2:], axis=1)], axis=0)
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("slides") / "mosaic.tif", mosaic, tile=256, mpp=BCCD_MPP)
    return path, mosaic


@pytest.fixture(scope="module")
def expected_wbc(bccd_small: Path) -> np.ndarray:
    """(5, 2) level-0 centres of the white cells the field source finds in the four fields."""
    fields = create_source("fields", bccd_small)
    centres = [fields.read_bag(s).coords + np.array([640 * (k % 2), 480 * (k // 2)]) for k, s in enumerate(MOSAIC)]
    return np.concatenate(centres)


def _match(found: np.ndarray, expected: np.ndarray, tol: float) -> None:
    assert len(found) == len(expected)
    for c in expected:
        assert np.min(np.hypot(*(found - c).T)) <= tol, (c, found)


def test_pyramidal_tiff_is_read_by_openslide_pixel_exact(mosaic_tiff: tuple[Path, np.ndarray]) -> None:
    path, mosaic = mosaic_tiff
    slide = open_slide(path)
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_dimensions[:3] == ((1280, 960), (640, 480), (320, 240))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(BCCD_MPP, rel=1e-6)
    level0 = np.asarray(slide.read_region((0, 0), 0, (1280, 960)).convert("RGB"))
    np.testing.assert_array_equal(level0, mosaic)
    slide.close()


def test_slide_detections_match_the_fields_in_level0_pixels(
    mosaic_tiff: tuple[Path, np.ndarray], expected_wbc: np.ndarray
) -> None:
    src = create_source("slides", mosaic_tiff[0])
    assert isinstance(src, SlideSource) and src.bag_ids() == ["mosaic"]
    batch = src.read_bag("mosaic")
    # the eosinophil of BloodImage_00010 lies at the border between two fields of the mosaic, so its
    # neighbourhood (and its centre) differs a little from the lone field's
    _match(batch.coords, expected_wbc, tol=30)
    assert batch.pixels.shape[1:] == (240, 240, 3) and batch.cell_ids[0] == "wbc00000"
    x, y = batch.coords[0]
    np.testing.assert_array_equal(batch.pixels[0], mosaic_tiff[1][y - 120 : y + 120, x - 120 : x + 120])


@pytest.mark.parametrize("options", [{"level": 1, "tile_size": 400}, {"mpp": 0.15, "tile_size": 400}])
def test_tiling_with_overlap_deduplicates_across_borders(
    mosaic_tiff: tuple[Path, np.ndarray], expected_wbc: np.ndarray, options: dict
) -> None:
    tiled = create_source("slides", mosaic_tiff[0], **options)
    scale = tiled.scale("mosaic")
    assert scale.downsample == pytest.approx(2.0) and scale.rbc_px == pytest.approx(50.0)
    assert len(tile_starts(scale.width, 400, 125)) == 2  # a 2 x 2 grid: cells straddle tile borders
    many = tiled.read_bag("mosaic")
    one = create_source("slides", mosaic_tiff[0], **{**options, "tile_size": 4096}).read_bag("mosaic")
    _match(many.coords, one.coords, tol=4)
    _match(many.coords, expected_wbc, tol=30)
    assert many.pixels.shape[1:] == (120, 120, 3)  # crop size in working pixels


def test_red_cells_on_a_slide(mosaic_tiff: tuple[Path, np.ndarray]) -> None:
    batch = create_source("slides", mosaic_tiff[0], cells="rbc", level=1).read_bag("mosaic")
    assert 40 <= len(batch) <= 120 and batch.pixels.shape[1:] == (70, 70, 3)
    assert batch.coords.min() >= 0 and batch.coords[:, 0].max() < 1280 and batch.coords[:, 1].max() < 960


def test_smear_mask_skips_empty_glass(bccd_small: Path, tmp_path: Path) -> None:
    field = read_rgb(bccd_small / "JPEGImages" / "BloodImage_00000.jpg")
    canvas = np.full((480, 1920, 3), 255, np.uint8)
    canvas[:, :640] = field
    path = write_pyramidal_tiff(tmp_path / "half.tif", canvas, tile=256, mpp=BCCD_MPP)
    mask, down = smear_mask(open_slide(path))
    cols = np.nonzero(mask.any(axis=0))[0] * down
    assert cols.max() < 800 and cols.min() < 50  # only the smear part
    batch = create_source("slides", path, tile_size=400).read_bag("half")
    assert len(batch) == 1


def test_openslide_fixtures(openslide_fixtures: Path, tmp_path: Path) -> None:
    src = create_source("slides", openslide_fixtures, rbc_diameter_px=20)
    assert src.bag_ids() == ["boxes", "boxes_0", "small"]  # boxes_0/1.dcm are one slide; png/md ignored
    for bag in src.bag_ids():
        batch = src.read_bag(bag)
        assert len(batch.pixels) == len(batch) and batch.failures == ()
    svs = create_source("slides", openslide_fixtures / "small.svs")
    scale = svs.scale("small")
    assert scale.mpp == pytest.approx(0.499) and scale.rbc_px == pytest.approx(7.5 / 0.499)
    boxes = open_slide(openslide_fixtures / "boxes.tiff")
    src = create_source("slides", openslide_fixtures / "boxes.tiff", level=0)
    region = read_rgb_region(boxes, src.scale("boxes"), 0, 0, 300, 250)
    expected = np.asarray(Image.open(openslide_fixtures / "boxes.png").convert("RGB"))
    assert np.abs(region.astype(int) - expected).mean() < 2.0
    level2 = create_source("slides", openslide_fixtures / "boxes.tiff", level=2).scale("boxes")
    assert level2.width == 74 and level2.downsample == pytest.approx(boxes.level_downsamples[2])


def test_not_a_slide_is_a_clear_error(openslide_fixtures: Path, tmp_path: Path) -> None:
    for name in ("boxes.png", "README.md"):
        with pytest.raises(UserError, match=rf"{name}: not a whole-slide image"):
            create_source("slides", openslide_fixtures / name)
    with pytest.raises(UserError, match="slide file or folder not found"):
        create_source("slides", tmp_path / "nothing.svs")
    shutil.copy(openslide_fixtures / "small.svs", tmp_path / "good.svs")
    (tmp_path / "broken.svs").write_bytes(b"not a slide at all")
    src = create_source("slides", tmp_path)
    assert src.bag_ids() == ["good"]
    assert [Path(f.path).name for f in src.failures] == ["broken.svs"]
    (tmp_path / "good.svs").unlink()
    (tmp_path / "broken.svs").unlink()
    with pytest.raises(UserError, match="no slide OpenSlide can read"):
        create_source("slides", tmp_path)


def test_bad_levels_and_resolutions(openslide_fixtures: Path) -> None:
    boxes = openslide_fixtures / "boxes.tiff"
    with pytest.raises(UserError, match="level 7 does not exist"):
        create_source("slides", boxes, level=7).scale("boxes")
    with pytest.raises(UserError, match="no microns-per-pixel"):
        create_source("slides", boxes, mpp=0.5).scale("boxes")
    src = create_source("slides", boxes, mpp=0.5)
    assert len(src.read_bag("boxes")) == 0 and "no microns-per-pixel" in src.failures[0].reason
    with pytest.raises(InvalidArgumentError, match="either level or mpp"):
        create_source("slides", boxes, level=0, mpp=0.5)
    with pytest.raises(InvalidArgumentError, match="cells must be one of"):
        create_source("slides", boxes, cells="platelets")


def test_slide_source_pickles_without_its_handle(mosaic_tiff: tuple[Path, np.ndarray]) -> None:
    src = create_source("slides", mosaic_tiff[0], level=1)
    first = src.read_bag("mosaic")
    again = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(again.read_bag("mosaic").coords, first.coords)
    src.close()


def test_tile_cores_partition_the_axis_and_merge_close() -> None:
    for length, tile, overlap in [(1000, 300, 100), (300, 300, 50), (1001, 256, 0), (50, 400, 100)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile >= length
        owners = np.zeros(length, dtype=int)
        for i in range(len(starts)):
            lo, hi = core_bounds(starts, i, tile, overlap)
            xs = np.arange(length)
            mine = (xs >= lo) & (xs < hi)
            owners += mine
            assert (xs[mine] >= starts[i] + (overlap / 2 if i else 0) - 1e-9).all()
            assert (xs[mine] < starts[i] + tile).all()
        assert (owners == 1).all()
    centres = np.array([[0.0, 0], [3, 0], [50, 0]])
    det = Detections(centres, np.zeros((3, 4), np.int64), np.ones(3), np.array([1.0, 2, 1]))
    kept = merge_close(det, 5.0)
    assert kept.centres.tolist() == [[3.0, 0.0], [50.0, 0.0]]


def test_unreadable_tiles_are_recorded_and_skipped(
    mosaic_tiff: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    import feature_cache.sources.slide_tiles as tiles

    real = tiles.read_rgb_region
    calls = {"n": 0}

    def flaky(*args: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("corrupt JPEG tile")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tiles, "read_rgb_region", flaky)
    batch = create_source("slides", mosaic_tiff[0], level=1, tile_size=400).read_bag("mosaic")
    assert [f.reason for f in batch.failures] == ["cannot read tile (corrupt JPEG tile)"]
    assert batch.failures[0].path.endswith("mosaic.tif#tile x=0,y=0")
    assert 1 <= len(batch) < 5  # the first tile's cells are lost, the others are found
