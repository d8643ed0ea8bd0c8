"""Pascal-VOC boxes and the cell detector on real BCCD fields."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from feature_cache.errors import InvalidArgumentError, UserError
from feature_cache.sources.detect import (
    Detections,
    DetectorConfig,
    detect_cells,
    detect_rbc,
    detect_wbc,
    detect_wbc_threshold,
    nucleus_mask,
)
from feature_cache.sources.image_io import read_rgb
from feature_cache.sources.voc import annotation_path, read_voc


def sample(bccd_dir: Path, count: int = 14) -> list[str]:
    """Field ids spread over BCCD (every 26th), scored like benchmarks/bench_detect.py."""
    stems = sorted(p.stem for p in (bccd_dir / "JPEGImages").glob("*.jpg"))
    return stems[:: len(stems) // count][:count]


def test_read_voc_bccd_counts(bccd_dir: Path) -> None:
    totals = {"WBC": 0, "RBC": 0, "Platelets": 0}
    dropped = 0
    for xml in sorted((bccd_dir / "Annotations").glob("*.xml")):
        ann = read_voc(xml)
        assert (ann.width, ann.height) == (640, 480)
        for box in ann.boxes:
            totals[box.label] += 1
            assert 0 <= box.x0 < box.x1 <= 640 and 0 <= box.y0 < box.y1 <= 480
        dropped += ann.dropped
    # README: 4,155 RBC, 372 WBC, 361 platelets; 2 boxes outside the image or degenerate
    assert totals["WBC"] == 372 and totals["Platelets"] == 361
    assert totals["RBC"] + dropped == 4155 and dropped == 2


def test_read_voc_clips_and_drops(tmp_path: Path) -> None:
    xml = tmp_path / "f.xml"
    obj = "<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>"
    obj += "</object>"
    body = "".join(
        obj.format(*o)
        for o in [("WBC", -5, 10, 50, 60), ("RBC", 90, 90, 130, 120), ("RBC", 200, 5, 210, 9), ("RBC", 30, 30, 30, 40)]
    )
    xml.write_text(f"<annotation><filename>f.jpg</filename><size><width>100</width><height>100</height></size>{body}</annotation>")
    ann = read_voc(xml)
    assert ann.dropped == 2  # outside the image, zero width
    assert [(b.label, b.x0, b.y0, b.x1, b.y1) for b in ann.boxes] == [("WBC", 0, 10, 50, 60), ("RBC", 90, 90, 100, 100)]
    assert ann.as_array("rbc").tolist() == [[90, 90, 100, 100]]
    assert ann.of("WBC")[0].contains(25, 35) and ann.of("WBC")[0].centre == (25, 35)
    (tmp_path / "bad.xml").write_text("<annotation><object><bndbox><xmin>a</xmin></bndbox></object>")
    with pytest.raises(UserError, match=r"bad\.xml"):
        read_voc(tmp_path / "bad.xml")


def test_annotation_path_follows_voc_layout(bccd_dir: Path) -> None:
    img = bccd_dir / "JPEGImages" / "BloodImage_00000.jpg"
    assert annotation_path(img) == bccd_dir / "Annotations" / "BloodImage_00000.xml"


def _score(fields: list[str], bccd_dir: Path, detector: Callable[[np.ndarray], Detections]) -> tuple[float, float]:
    found = boxes = correct = total = 0
    for stem in fields:
        rgb = read_rgb(bccd_dir / "JPEGImages" / f"{stem}.jpg")
        wbc = read_voc(bccd_dir / "Annotations" / f"{stem}.xml").of("WBC")
        det = detector(rgb)
        boxes += len(wbc)
        found += sum(any(b.contains(*c) for c in det.centres) for b in wbc)
        total += len(det)
        correct += sum(any(b.contains(*c) for b in wbc) for c in det.centres)
    return found / boxes, correct / max(total, 1)


def test_wbc_detector_finds_the_boxed_white_cells(bccd_dir: Path) -> None:
    recall, precision = _score(sample(bccd_dir), bccd_dir, detect_wbc)
    assert recall == 1.0 and precision == 1.0
    base_recall, _ = _score(sample(bccd_dir), bccd_dir, detect_wbc_threshold)
    assert base_recall == 1.0


def test_detections_are_well_formed(bccd_field: np.ndarray) -> None:
    det = detect_wbc(bccd_field)
    assert len(det) == 1
    x, y = det.centres[0]
    x0, y0, x1, y1 = det.boxes[0]
    assert x0 <= x <= x1 and y0 <= y <= y1 and 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    assert det.areas[0] > 0.35 * np.pi / 4 * 100**2 and det.scores[0] > 0.29
    # lands in the annotated box (260, 177, 491, 376)
    assert 260 <= x <= 491 and 177 <= y <= 376


def test_touching_white_cells_are_split_by_watershed(bccd_dir: Path) -> None:
    """Two copies of a real round nucleus pasted so that they touch: one blob, two detections."""
    from scipy import ndimage as ndi

    from feature_cache.sources import detect_ops as ops

    field = read_rgb(bccd_dir / "JPEGImages" / "BloodImage_00152.jpg")
    labels, _ = ndi.label(nucleus_mask(field, DetectorConfig()))
    nucleus = ops.disk_dilate(labels == labels[103, 207], 4)  # the white cell at (207, 103)
    ys, xs = np.nonzero(nucleus)
    patch = field[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    inside = nucleus[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = inside.shape
    glass = ops.background_rgb(field).astype(np.uint8)
    offset = int(0.95 * w)  # the second nucleus overlaps the first by 5 %
    canvas = np.empty((h + 100, w + offset + 100, 3), np.uint8)
    canvas[...] = glass
    for ox in (50, 50 + offset):
        canvas[50 : 50 + h, ox : ox + w][inside] = patch[inside]
    _, blobs = ndi.label(nucleus_mask(canvas, DetectorConfig()))
    assert blobs == 1  # the nuclei touch
    det = detect_wbc(canvas)
    assert len(det) == 2
    centres = sorted(det.centres[:, 0])
    assert abs(centres[0] - (50 + w / 2)) < 0.2 * w and abs(centres[1] - (50 + offset + w / 2)) < 0.2 * w
    single = canvas[:, : 50 + w + 40]
    assert len(detect_wbc(single)) == 1


def test_watershed_keeps_one_round_blob_and_splits_a_figure_eight() -> None:
    from feature_cache.sources.detect_ops import watershed_split

    yy, xx = np.mgrid[:80, :140]
    one = (yy - 40) ** 2 + (xx - 50) ** 2 < 30**2
    eight = one | ((yy - 40) ** 2 + (xx - 100) ** 2 < 28**2)
    assert watershed_split(one, 20, 10, 5).max() == 1
    labels = watershed_split(eight, 20, 10, 5)
    assert labels.max() == 2 and (labels[eight] > 0).all() and (labels[~eight] == 0).all()
    assert labels[40, 45] != labels[40, 105]
    assert watershed_split(eight, 20, 10, 60).max() == 1  # a shallow neck is merged back


def test_rbc_detector_recall_on_real_fields(bccd_dir: Path) -> None:
    found = boxes = 0
    for stem in sample(bccd_dir, 6):
        rgb = read_rgb(bccd_dir / "JPEGImages" / f"{stem}.jpg")
        rbc = read_voc(bccd_dir / "Annotations" / f"{stem}.xml").of("RBC")
        det = detect_rbc(rgb)
        assert 5 <= len(det) <= 40
        assert (det.boxes[:, 2] - det.boxes[:, 0] <= 100).all()
        boxes += len(rbc)
        found += sum(any(b.contains(*c) for c in det.centres) for b in rbc)
    assert found / boxes >= 0.85


def test_detector_scales_with_rbc_diameter(bccd_field: np.ndarray) -> None:
    from PIL import Image

    half = np.asarray(Image.fromarray(bccd_field).resize((320, 240), Image.Resampling.BOX))
    full = detect_wbc(bccd_field)
    small = detect_wbc(half, DetectorConfig(rbc_diameter_px=50))
    assert len(small) == 1
    np.testing.assert_allclose(small.centres[0] * 2, full.centres[0], atol=6)


def test_blank_and_invalid_images() -> None:
    glass = np.full((200, 300, 3), 215, np.uint8)
    assert len(detect_wbc(glass)) == 0 and len(detect_rbc(glass)) == 0
    assert len(detect_wbc_threshold(glass)) == 0
    with pytest.raises(InvalidArgumentError, match="uint8 RGB"):
        detect_wbc(np.zeros((10, 10), np.uint8))
    with pytest.raises(InvalidArgumentError, match="unknown cell kind"):
        detect_cells(glass, "platelet")
    with pytest.raises(InvalidArgumentError, match="unknown detector option"):
        DetectorConfig().replace(nope=1.0)
    with pytest.raises(InvalidArgumentError, match="must be > 0"):
        DetectorConfig(rbc_diameter_px=0)
    assert len(Detections.concat([])) == 0
