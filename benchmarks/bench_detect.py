"""Benchmark: the cell detector on the BCCD smear fields, against the plain colour-threshold baseline.

For every field (364 in BCCD) it runs, in the same process and on the same decoded image:
  * ``baseline``: the plain detector the issue describes, a fixed colour threshold on the violet
    nucleus stain (blue exceeds red and green by 30) with opening, closing and an area filter
    (:func:`feature_cache.sources.detect.detect_wbc_threshold`);
  * ``detector``: :func:`feature_cache.sources.detect.detect_wbc` (colour deconvolution,
    hysteresis, lobe closing, shape/stain filters, watershed for touching cells);
  * ``rbc``: :func:`feature_cache.sources.detect.detect_rbc` (gradient Hough transform for discs).

White cells are scored against the WBC boxes: a detection is correct when its centre falls inside
a WBC box (precision); a box is found when at least one centre falls inside it (recall); boxes
holding several centres are counted as ``split``. Red cells are scored by recall against the RBC
boxes only (BCCD leaves many red cells unboxed, so a precision would be meaningless); the number
of detections per field is reported beside the number of boxes. Figures are given on all fields
and on BCCD's ``test`` split (ImageSets/Main/test.txt).

Targets (issue 4): WBC recall >= 0.98 and precision >= 0.9, and not worse than the baseline.

Usage:
    python benchmarks/bench_detect.py [--data ../shared/data/bccd] [--out DIR] [--quick] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from feature_cache.sources.detect import DetectorConfig, detect_rbc, detect_wbc, detect_wbc_threshold
from feature_cache.sources.image_io import read_rgb
from feature_cache.sources.voc import read_voc

log = logging.getLogger("bench_detect")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MILCORE_SHARED_DATA", REPO.parent / "shared" / "data")) / "bccd"
TARGET_RECALL, TARGET_PRECISION = 0.98, 0.90
QUICK_FIELDS = 40
T = TypeVar("T")


def _inside(centres: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(n, k) bool: centre i lies in box j (edges included)."""
    if len(centres) == 0 or len(boxes) == 0:
        return np.zeros((len(centres), len(boxes)), dtype=bool)
    x, y = centres[:, 0:1], centres[:, 1:2]
    return (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])


class Tally:
    """Running counts of one method."""

    def __init__(self) -> None:
        self.boxes = self.found = self.split = self.detections = self.correct = 0
        self.seconds = 0.0
        self.fields = 0

    def add(self, centres: np.ndarray, boxes: np.ndarray, seconds: float) -> None:
        hit = _inside(centres, boxes)  # (n, k)
        self.fields += 1
        self.seconds += seconds
        self.boxes += len(boxes)
        self.detections += len(centres)
        per_box = hit.sum(axis=0)
        self.found += int((per_box > 0).sum())
        self.split += int((per_box > 1).sum())
        self.correct += int(hit.any(axis=1).sum())

    def summary(self, with_precision: bool = True) -> dict[str, float | int | None]:
        return {
            "fields": self.fields,
            "boxes": self.boxes,
            "detections": self.detections,
            "recall": self.found / max(self.boxes, 1),
            "precision": (self.correct / max(self.detections, 1)) if with_precision else None,
            "split_boxes": self.split,
            "detections_per_field": self.detections / max(self.fields, 1),
            "ms_per_field": 1000 * self.seconds / max(self.fields, 1),
        }


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def run(data: Path, limit: int | None = None) -> dict:
    """Score the baseline and the detector on the fields of a VOC/BCCD folder."""
    images = sorted((data / "JPEGImages").glob("*.jpg"))
    if not images:
        raise SystemExit(f"no BCCD fields under {data / 'JPEGImages'} (pass --data)")
    if limit:
        step = max(1, len(images) // limit)
        images = images[::step][:limit]  # spread over the whole set
    test_ids = set()
    split_file = data / "ImageSets" / "Main" / "test.txt"
    if split_file.is_file():
        test_ids = set(split_file.read_text().split())
    config = DetectorConfig()
    methods = ("baseline", "detector")
    tallies = {(m, s): Tally() for m in methods for s in ("all", "test")}
    rbc = {s: Tally() for s in ("all", "test")}
    for path in images:
        rgb = read_rgb(path)
        ann = read_voc(data / "Annotations" / f"{path.stem}.xml", width=rgb.shape[1], height=rgb.shape[0])
        wbc_boxes, rbc_boxes = ann.as_array("WBC"), ann.as_array("RBC")
        subsets = ("all", "test") if path.stem in test_ids else ("all",)
        base, t_base = _timed(detect_wbc_threshold, rgb)
        ours, t_ours = _timed(detect_wbc, rgb, config)
        reds, t_red = _timed(detect_rbc, rgb, config)
        for s in subsets:
            tallies[("baseline", s)].add(base.centres, wbc_boxes, t_base)
            tallies[("detector", s)].add(ours.centres, wbc_boxes, t_ours)
            rbc[s].add(reds.centres, rbc_boxes, t_red)
    wbc = {m: {s: tallies[(m, s)].summary() for s in ("all", "test")} for m in methods}
    det, base = wbc["detector"]["all"], wbc["baseline"]["all"]
    checks = {
        "recall_target": det["recall"] >= TARGET_RECALL,
        "precision_target": det["precision"] >= TARGET_PRECISION,
        "recall_not_below_baseline": det["recall"] >= base["recall"],
        "precision_not_below_baseline": det["precision"] >= base["precision"],
    }
    return {
        "benchmark": "detect",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "data": str(data),
        "fields": len(images),
        "test_fields": sum(p.stem in test_ids for p in images),
        "targets": {"wbc_recall": TARGET_RECALL, "wbc_precision": TARGET_PRECISION},
        "detector_config": vars(config),
        "wbc": wbc,
        "rbc": {s: rbc[s].summary(with_precision=False) for s in ("all", "test")},
        "checks": checks,
        "targets_met": all(checks.values()),
    }


def format_table(result: dict) -> str:
    """The result as Markdown tables."""
    lines = [
        f"BCCD fields: {result['fields']} (test split: {result['test_fields']})",
        "",
        "| WBC method | fields | boxes | detections | recall | precision | split boxes | ms/field |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, by_subset in result["wbc"].items():
        for subset, r in by_subset.items():
            lines.append(
                f"| {method} | {subset} | {r['boxes']} | {r['detections']} | {r['recall']:.3f} | "
                f"{r['precision']:.3f} | {r['split_boxes']} | {r['ms_per_field']:.0f} |"
            )
    lines += ["", "| RBC detector | fields | boxes | detections/field | recall | ms/field |"]
    lines += ["|---|---|---:|---:|---:|---:|"]
    for subset, r in result["rbc"].items():
        lines.append(
            f"| rbc | {subset} | {r['boxes']} | {r['detections_per_field']:.1f} | {r['recall']:.3f} | "
            f"{r['ms_per_field']:.0f} |"
        )
    checks = ", ".join(f"{k}: {v}" for k, v in result["checks"].items())
    lines += ["", f"Targets (WBC recall >= 0.98, precision >= 0.90, not below baseline): {checks}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the tables and writes ``bench.json``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BCCD folder (JPEGImages/, Annotations/)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/detect"))
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_FIELDS} fields spread over the set")
    parser.add_argument("--limit", type=int, default=None, help="score only N fields spread over the set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    limit = args.limit or (QUICK_FIELDS if args.quick else None)
    result = run(args.data, limit)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2))
    sys.stdout.write(format_table(result) + "\n")
    log.info("wrote %s", args.out / "bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
