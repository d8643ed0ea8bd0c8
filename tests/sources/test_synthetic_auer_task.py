"""The ``auer`` task: a myeloblast whose Auer rod is the only thing a model can diagnose from.

It exists to test pixel explanations (issue 16): in the AML task the rod comes with its cell type, so a model
need not look at it; here every patient carries myeloblasts and the rod alone marks the positive class.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from feature_cache.sources.synthetic import SynthConfig, write_cohort
from feature_cache.sources.synthetic_attributes import WHITE_ATTRIBUTES, CellTruth
from feature_cache.sources.synthetic_render import CellRenderer
from feature_cache.sources.synthetic_truth import read_masks
from feature_cache.sources.synthetic_vocab import TASKS, WHITE_CELLS


def test_the_rod_cell_is_a_myeloblast_with_one_rod_and_nothing_else() -> None:
    rod, blast = WHITE_CELLS["myeloblast_rod"], WHITE_CELLS["myeloblast"]
    assert rod.auer_rods == (1.0, 1.0) and rod.auer_probability == 1.0 and blast.auer_rods == (0.0, 0.0)
    assert replace(rod, auer_rods=blast.auer_rods, mimic=blast.mimic) == blast
    assert rod.mimic == "myeloblast", "subtlety fades the rod toward the plain myeloblast"


def test_pixels_differ_only_at_the_rod() -> None:
    """The same draws render the same cell with and without its rod: beyond 2 px of the rod the crops differ by
    the pixel noise alone (drawn after the rod, so re-drawn), on the rod by tens of grey levels."""
    renderer = CellRenderer(96, seed=0)
    for seed in range(4):
        with_rod, plain = CellTruth(), CellTruth()
        a = renderer.render("myeloblast_rod", np.random.default_rng(seed), truth=with_rod).astype(float)
        b = renderer.render("myeloblast", np.random.default_rng(seed), truth=plain).astype(float)
        rod = with_rod.masks["auer_rod"]
        assert rod.any() and "auer_rod" not in plain.masks
        diff = np.abs(a - b).mean(axis=-1)  # (S, S)
        away = ~ndimage.binary_dilation(rod, iterations=2)
        assert diff[away].mean() < 4.0, f"seed {seed}: the cells differ away from the rod"
        assert diff[rod].mean() > 30.0, f"seed {seed}: the rod is not visible"
        drawn = {k: v for k, v in with_rod.values.items() if k != "auer_rods"}
        assert drawn == {k: v for k, v in plain.values.items() if k != "auer_rods"}
        assert with_rod.attributes() == {**plain.attributes(), "auer_rods": "yes"}


def test_cohort_every_patient_has_blasts_and_the_rod_is_the_diagnostic_feature(tmp_path: Path) -> None:
    config = SynthConfig(task="auer", patients=8, seed=3, bag_median=60, bag_range=(40, 80), witness_median=0.1)
    write_cohort(config, tmp_path / "c")
    with open(tmp_path / "c" / "cells.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    with open(tmp_path / "c" / "cohort.csv", newline="") as f:
        label = {r["patient_id"]: r["auer"] for r in csv.DictReader(f)}
    task = TASKS["auer"]
    assert set(label.values()) == set(task.classes) == {"no_auer_rods", "auer_rods"}
    blasts = {c["patient_id"] for c in cells if c["cell_type"] == "myeloblast"}
    assert blasts == set(label), "plain myeloblasts in every patient, of both classes"
    diagnostic = [c for c in cells if c["is_diagnostic"] == "1"]
    assert diagnostic and {label[c["patient_id"]] for c in diagnostic} == {"auer_rods"}
    assert {c["cell_type"] for c in diagnostic} == {"myeloblast_rod"}
    assert {c["diagnostic_feature"] for c in diagnostic} == {"auer_rod"}
    assert {c["auer_rods"] for c in diagnostic} == {"yes"}
    assert {c["auer_rods"] for c in cells if c["cell_type"] == "myeloblast"} == {"no"}
    blast_rows = [c for c in cells if c["cell_type"] == "myeloblast"]
    for attribute in (a for a in WHITE_ATTRIBUTES if a != "auer_rods"):
        assert {c[attribute] for c in diagnostic} <= {c[attribute] for c in blast_rows}, attribute
    masks = read_masks(tmp_path / "c" / "masks.h5")
    assert {(c["patient_id"], c["cell_id"]) for c in diagnostic} == set(masks)
    assert {m.feature for m in masks.values()} == {"auer_rod"}
    assert all((m.mask & m.cell).any() for m in masks.values()), "the rod lies in the cell"
