"""The synthetic blood-smear cohort: the engine's embedded default data and ground truth.

:func:`write_cohort` writes the layout real datasets use::

    OUT/<patient_id>/<cell_id>.png   96 x 96 RGB single-cell crops
    OUT/cohort.csv                   patient_id, <task> label, age, sex, site, date, fold, split, ...
    OUT/cells.csv                    patient_id, cell_id, cell_type, is_diagnostic, x, y, diagnostic_feature,
                                     then the cell's attributes (WBCAtt-style for white cells: cell_size,
                                     nucleus_shape, nc_ratio, chromatin, ..., auer_rods; red cells: cell_size,
                                     cell_shape, central_pallor, colour)
    OUT/masks.h5                     per diagnostic cell, the mask of its diagnostic feature and of the cell
    OUT/synth.json                   the configuration, class counts and provenance

The attributes and masks record what the renderer drew (see
:mod:`~feature_cache.sources.synthetic_attributes`); recording them draws no random number, so the
crops and the first six columns of ``cells.csv`` are those of a cohort written without them.

The output appears atomically: it is written into a hidden sibling folder and renamed at the end,
so an error or an interrupt never leaves a half-written cohort behind.

Example:
    >>> cfg = SynthConfig(task="aml", patients=60, seed=1)
    >>> summary = write_cohort(cfg, "runs/cohort")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feature_cache import __version__
from feature_cache.errors import OutputExistsError, UserError
from feature_cache.progress import progress
from feature_cache.sources.synthetic_attributes import ATTRIBUTE_COLUMNS
from feature_cache.sources.synthetic_cohort import SAMPLING_VERSION, CellTable, PatientRecord, SyntheticCohort
from feature_cache.sources.synthetic_config import Bias, Confound, SynthConfig, parse_bias, parse_confound
from feature_cache.sources.synthetic_truth import MASKS_FILE, FeatureMask, MaskTable, write_masks
from feature_cache.sources.synthetic_vocab import TASKS, list_cell_types, list_tasks

__all__ = [
    "Bias",
    "CohortSummary",
    "Confound",
    "SynthConfig",
    "SyntheticCohort",
    "encode_png",
    "list_cell_types",
    "list_tasks",
    "parse_bias",
    "parse_confound",
    "write_cohort",
]

log = logging.getLogger(__name__)

COHORT_COLUMNS = (
    "patient_id", "{task}", "age", "sex", "site", "date", "fold", "split",
    "n_cells", "n_diagnostic", "witness_rate", "subtlety", "biased",
)  # fmt: skip
CELL_COLUMNS = ("patient_id", "cell_id", "cell_type", "is_diagnostic", "x", "y")
#: Columns of ``cells.csv`` after :data:`CELL_COLUMNS`: the diagnostic feature, then the lineage's attributes.
TRUTH_COLUMN = "diagnostic_feature"


def truth_columns(task: str) -> tuple[str, ...]:
    """The ground-truth columns ``cells.csv`` holds after :data:`CELL_COLUMNS` for a task."""
    return (TRUTH_COLUMN, *ATTRIBUTE_COLUMNS[TASKS[task].lineage])


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`write_cohort` wrote.

    Attributes:
        out: the cohort folder.
        patients: number of patients.
        cells: number of crops.
        classes: patients per class.
        seconds: wall time.
    """

    out: Path
    patients: int
    cells: int
    classes: dict[str, int]
    seconds: float

    @property
    def crops_per_second(self) -> float:
        """End-to-end throughput (render + encode + write)."""
        return self.cells / self.seconds if self.seconds > 0 else float("inf")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _deflate(data: bytes, level: int) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return packer.compress(data) + packer.flush()


def encode_png(img: np.ndarray, level: int = 1) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG (``Up`` filter, Huffman-only deflate).

    About twice as fast as Pillow's encoder for small noisy crops, with files about 5% larger.
    """
    h, w, c = img.shape
    flat = np.ascontiguousarray(img).reshape(h, w * c)
    raw = np.empty((h, w * c + 1), dtype=np.uint8)  # (H, 1 + W*C): filter byte + row
    raw[:, 0] = 2
    raw[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=raw[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", _deflate(raw.tobytes(), level)),
            _png_chunk(b"IEND", b""),
        )
    )


@dataclass
class _PatientTruth:
    """What one patient's rendering recorded: a ``cells.csv`` truth row per cell and the diagnostic masks."""

    rows: list[list[str]]
    masks: MaskTable


def _write_patient(cohort: SyntheticCohort, patient: PatientRecord, root: Path) -> tuple[CellTable, _PatientTruth]:
    folder = root / patient.patient_id
    folder.mkdir()
    cells = cohort.cells(patient)
    columns = ATTRIBUTE_COLUMNS[cohort.task.lineage]
    truth = _PatientTruth([], {})
    for cell_id, ctype, diag, (crop, drawn) in zip(cells.cell_ids(), cells.cell_type, cells.is_diagnostic,
                                                   cohort.iter_truth(patient, cells), strict=True):  # fmt: skip
        (folder / f"{cell_id}.png").write_bytes(encode_png(crop))
        feature = drawn.diagnostic_feature(str(ctype)) if diag else None
        if feature is not None:
            truth.masks[(patient.patient_id, cell_id)] = FeatureMask(feature, drawn.masks[feature],
                                                                     drawn.masks["cell"])  # fmt: skip
        attrs = drawn.attributes()
        truth.rows.append([feature or "", *(attrs[c] for c in columns)])
    return cells, truth


_WORKER: dict[str, object] = {}


def _worker_init(config: SynthConfig, root: str) -> None:
    _WORKER["cohort"] = SyntheticCohort(config)
    _WORKER["root"] = Path(root)


def _worker_run(index: int) -> tuple[int, _PatientTruth]:
    cohort = _WORKER["cohort"]
    assert isinstance(cohort, SyntheticCohort)
    _, truth = _write_patient(cohort, cohort.patients[index], _WORKER["root"])  # type: ignore[arg-type]
    return index, truth


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    parent = out.parent if out.parent != Path("") else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"{parent}: cannot create output folder ({exc.strerror})") from exc
    if not parent.is_dir():
        raise UserError(f"{parent}: is not a folder, cannot write {out.name} in it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{parent}: output folder is not writable")


def _write_tables(cohort: SyntheticCohort, tables: dict[int, CellTable], truths: dict[int, _PatientTruth],
                  root: Path) -> None:  # fmt: skip
    task = cohort.config.task
    header = [c.format(task=task) for c in COHORT_COLUMNS]
    with open(root / "cohort.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for p in cohort.patients:
            writer.writerow(
                [p.patient_id, p.label, p.age, p.sex, p.site, p.date, p.fold, p.split, p.n_cells,
                 p.n_diagnostic, f"{p.witness_rate:.6f}", f"{p.subtlety:.6f}", int(p.biased)]
            )  # fmt: skip
    with open(root / "cells.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CELL_COLUMNS, *truth_columns(task)])
        for p in cohort.patients:
            cells = tables[p.index]
            for cid, ctype, diag, (x, y), extra in zip(
                cells.cell_ids(), cells.cell_type, cells.is_diagnostic, cells.coords, truths[p.index].rows, strict=True
            ):
                writer.writerow([p.patient_id, cid, ctype, int(diag), int(x), int(y), *extra])
    masks: MaskTable = {}
    for truth in truths.values():
        masks.update(truth.masks)
    write_masks(root / MASKS_FILE, masks, cohort.config.crop_size)


def write_cohort(
    config: SynthConfig, out: str | os.PathLike, *, overwrite: bool = False, workers: int = 1
) -> CohortSummary:
    """Render and write a synthetic cohort (crops, ``cohort.csv``, ``cells.csv``, ``synth.json``).

    Args:
        config: the cohort to generate.
        out: destination folder; must be absent or empty unless ``overwrite``.
        overwrite: replace an existing non-empty folder (only once the new cohort is complete).
        workers: processes rendering patients in parallel (the output does not depend on it).

    Returns:
        A :class:`CohortSummary`.

    Raises:
        OutputExistsError: ``out`` is not empty and ``overwrite`` is False.
        UserError: ``out`` cannot be written.
    """
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    _check_output(out, overwrite)
    cohort = SyntheticCohort(config)
    patients = cohort.patients
    total = sum(p.n_cells for p in patients)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    start = time.perf_counter()
    tmp.mkdir()
    try:
        bar = progress(total=total, desc=f"synth {config.task}", unit="cells")
        tables: dict[int, CellTable] = {}
        truths: dict[int, _PatientTruth] = {}
        if workers == 1 or len(patients) == 1:
            for p in patients:
                tables[p.index], truths[p.index] = _write_patient(cohort, p, tmp)
                bar.update(len(tables[p.index]))
        else:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers, _worker_init, (config, str(tmp))) as pool:
                for index, truth in pool.imap_unordered(_worker_run, range(len(patients))):
                    truths[index] = truth
                    bar.update(len(truth.rows))
            tables = {p.index: cohort.cells(p) for p in patients}
        bar.close()
        _write_tables(cohort, tables, truths, tmp)
        classes = dict(Counter(p.label for p in patients))
        meta = {
            "format": "milcore-synthetic-cohort",
            "format_version": 1,
            "sampling_version": SAMPLING_VERSION,
            "generated_by": f"feature_cache {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config.to_dict(),
            "patients": len(patients),
            "cells": total,
            "classes": classes,
            "cell_types": dict(Counter(str(t) for tab in tables.values() for t in tab.cell_type)),
            "label_column": config.task,
        }
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = CohortSummary(out, len(patients), total, classes, time.perf_counter() - start)
    log.info(
        "wrote %d patients, %d cells to %s (%.0f cells/s)", summary.patients, summary.cells, out,
        summary.crops_per_second,
    )  # fmt: skip
    return summary


def _register() -> None:
    from feature_cache.sources.registry import register_source
    from feature_cache.sources.synthetic_source import SyntheticSource

    register_source("synthetic", SyntheticSource)


_register()
