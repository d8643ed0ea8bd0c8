"""Sampling of the synthetic cohort: patients (labels, age, sex, site, date, splits) and their cells.

Everything about patient ``i`` (label, age, sex, site, date, fold hint, bag size, witness rate, cells
and pixels) depends only on the seed, the configuration other than ``patients``, and ``i``: patient
``i`` of a 10-patient cohort is patient ``i`` of a 25-patient one, whatever the order or the number
of worker processes. Per-patient draws come from a generator seeded by ``(seed, stream, i)``. The
cohort-level properties are kept by drawing in blocks that never look ahead: labels are assigned to
consecutive blocks of C patients (C classes), each block a seeded permutation of the classes, so any
cohort's class counts differ by at most one; the fold hint of the k-th patient of a class comes from
a seeded permutation of the folds for that class's block ``k // folds``, so fold hints are stratified
within one patient per class. Bag ids are zero-padded to 4 digits (wider only from 10,000 patients).

Planted label confounds (``SynthConfig.confounds``) and the renderer's ground truth (attributes and
masks, :meth:`SyntheticCohort.iter_truth`) draw nothing from these streams (confounds have a stream
of their own), so they change no other draw.

``SAMPLING_VERSION`` numbers this scheme (2; version 1 drew labels, sizes and metadata from one
generator sized by the patient count). It is written to ``synth.json`` and checked when a cohort
folder is re-rendered, so cells are never re-drawn with another scheme than the crops on disk.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from feature_cache.sources.synthetic_attributes import CellTruth
from feature_cache.sources.synthetic_config import SynthConfig
from feature_cache.sources.synthetic_render import CellRenderer, SiteStyle
from feature_cache.sources.synthetic_vocab import TASKS, TaskSpec

_META, _CELLS, _PIXELS, _SITES, _STYLE, _LABEL, _FOLD, _CONFOUND = 1, 2, 3, 4, 5, 6, 7, 8
SAMPLING_VERSION = 2  # see the module docstring; bump whenever a patient's draws change
EPOCH = dt.date(2024, 1, 1)
SMEAR_EXTENT = 20_000  # virtual smear side (pixels) over which cell coordinates are spread


@dataclass(frozen=True)
class PatientRecord:
    """One patient of the cohort (a row of ``cohort.csv``).

    Attributes:
        index: position in the cohort (0-based).
        patient_id: bag id (folder name).
        label: class name for the cohort's task.
        age: age in years.
        sex: ``"F"`` or ``"M"``.
        site: acquisition site index.
        date: acquisition date (ISO).
        fold: stratified fold index (split hint).
        split: ``train``/``val``/``test`` split hint.
        n_cells: bag size.
        n_diagnostic: number of diagnostic cells (0 for controls).
        witness_rate: planted fraction of diagnostic cells.
        subtlety: subtlety of this patient's abnormal cells.
        biased: whether a planted bias applies to this patient.
    """

    index: int
    patient_id: str
    label: str
    age: int
    sex: str
    site: int
    date: str
    fold: int
    split: str
    n_cells: int
    n_diagnostic: int
    witness_rate: float
    subtlety: float
    biased: bool


@dataclass(frozen=True)
class CellTable:
    """The cells of one patient, in file order.

    Attributes:
        cell_type: (n,) cell type names.
        is_diagnostic: (n,) bool, True for the disease's witness cells.
        coords: (n, 2) int64 positions on a virtual smear.
    """

    cell_type: np.ndarray
    is_diagnostic: np.ndarray
    coords: np.ndarray

    def __len__(self) -> int:
        return len(self.cell_type)

    def cell_ids(self) -> list[str]:
        """Cell ids (file stems) in order."""
        return [f"c{i:05d}" for i in range(len(self))]


def _split_name(fold: int, folds: int) -> str:
    if fold == folds - 1:
        return "test"
    if fold == folds - 2:
        return "val"
    return "train"


class SyntheticCohort:
    """A deterministic synthetic blood-smear cohort for one task.

    Args:
        config: the cohort's configuration.
    """

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.task: TaskSpec = TASKS[config.task]

    # ------------------------------------------------------------------ patients
    @cached_property
    def patients(self) -> list[PatientRecord]:
        """All patients, classes balanced within one, with metadata and split hints."""
        cfg = self.config
        labels = self._labels(cfg.patients)
        folds = self._folds(labels)
        width = max(4, len(str(cfg.patients)))
        return [self._patient_record(i, labels[i], folds[i], width) for i in range(cfg.patients)]

    def _block_permutation(self, stream: int, block: int, n: int, key: int = 0) -> np.ndarray:
        return np.random.default_rng([self.config.seed, stream, key, block]).permutation(n)

    def _labels(self, n: int) -> list[str]:
        """Class of each patient: block ``i // C`` is a seeded permutation of the C classes."""
        classes = self.task.classes
        c = len(classes)
        perms = [self._block_permutation(_LABEL, b, c) for b in range(-(-n // c))]
        return [classes[perms[i // c][i % c]] for i in range(n)]

    def _folds(self, labels: list[str]) -> list[int]:
        """Fold hint of each patient: the k-th patient of a class takes slot ``k % folds`` of its
        class's seeded permutation for block ``k // folds`` (stratified, prefix-stable)."""
        k_folds, seen, out = self.config.folds, Counter(), []
        for label in labels:
            k = seen[label]
            seen[label] += 1
            key = self.task.classes.index(label)
            out.append(int(self._block_permutation(_FOLD, k // k_folds, k_folds, key)[k % k_folds]))
        return out

    def _patient_record(self, i: int, label: str, fold: int, width: int) -> PatientRecord:
        """Patient ``i``'s metadata, size and witness rate, from its own generator."""
        cfg, task = self.config, self.task
        rng = np.random.default_rng([cfg.seed, _META, i])
        age = int(np.clip(np.rint(rng.normal(58, 16)), 18, 90))
        sex = str(rng.choice(["F", "M"]))
        site = int(rng.integers(0, cfg.sites))
        day = int(rng.integers(0, 366))
        lo, hi = cfg.bag_range
        n = int(np.clip(np.rint(cfg.bag_median * np.exp(rng.normal(0, cfg.bag_sigma))), lo, hi))
        wlo, whi = cfg.witness_range
        rate = float(np.clip(cfg.witness_median * np.exp(rng.normal(0, cfg.witness_sigma)), wlo, whi))
        if cfg.confounds:
            site, day = self._confound(i, label, site, day)
        subtle, biased = cfg.subtlety, False
        for bias in cfg.biases:
            if bias.matches(sex, age, site):
                biased = True
                if bias.kind == "rate":
                    rate *= bias.factor
                else:
                    subtle = min(1.0, subtle + bias.factor)
        if label == task.control:
            rate, n_diag = 0.0, 0
        else:
            rate = min(rate, 1.0)
            n_diag = int(min(n, max(1, round(rate * n))))
        return PatientRecord(
            index=i,
            patient_id=f"{cfg.task}-{i + 1:0{width}d}",
            label=label,
            age=age,
            sex=sex,
            site=site,
            date=(EPOCH + dt.timedelta(days=day)).isoformat(),
            fold=fold,
            split=_split_name(fold, cfg.folds),
            n_cells=n,
            n_diagnostic=n_diag,
            witness_rate=round(rate, 6),
            subtlety=round(subtle, 6),
            biased=biased,
        )

    def _confound(self, i: int, label: str, site: int, day: int) -> tuple[int, int]:
        """Site and day of patient ``i`` after the planted confounds (own generator: no other draw moves)."""
        rng = np.random.default_rng([self.config.seed, _CONFOUND, i])
        k, n_classes = self.task.classes.index(label), len(self.task.classes)
        for confound in self.config.confounds:
            hit, u = rng.random() < confound.strength, float(rng.random())
            if not hit:
                continue
            if confound.column == "site":
                site = k % self.config.sites
            else:
                period = 366 // n_classes
                day = k * period + int(u * period)
        return site, day

    def patient(self, patient_id: str) -> PatientRecord:
        """Look up a patient by id."""
        for p in self.patients:
            if p.patient_id == patient_id:
                return p
        raise KeyError(patient_id)

    # ------------------------------------------------------------------ cells
    def cells(self, patient: PatientRecord) -> CellTable:
        """The patient's cell types and ground truth (cheap: no rendering)."""
        cfg, task = self.config, self.task
        rng = np.random.default_rng([cfg.seed, _CELLS, patient.index])
        n, n_diag = patient.n_cells, patient.n_diagnostic
        names: list[str] = []
        if n_diag:
            mix = task.mixtures[patient.label]
            p = np.array(list(mix.values()), dtype=float)
            names += list(rng.choice(list(mix), size=n_diag, p=p / p.sum()))
        rest = n - n_diag
        conf_rate = rng.uniform(0, task.confounder_rate * cfg.confounder_scale) if task.confounders else 0.0
        n_conf = int(rng.binomial(rest, min(conf_rate, 1.0))) if rest else 0
        if n_conf:
            cp = np.array(list(task.confounders.values()), dtype=float)
            names += list(rng.choice(list(task.confounders), size=n_conf, p=cp / cp.sum()))
        bg_names = list(task.background)
        bg = np.array(list(task.background.values()), dtype=float)
        probs = rng.dirichlet(cfg.background_concentration * bg / bg.sum()) if len(bg) > 1 else np.ones(1)
        names += list(rng.choice(bg_names, size=rest - n_conf, p=probs))
        diagnostic = np.zeros(n, dtype=bool)
        diagnostic[:n_diag] = True
        order = rng.permutation(n)
        coords = rng.integers(0, SMEAR_EXTENT, size=(n, 2), dtype=np.int64)
        return CellTable(np.asarray(names, dtype=object)[order], diagnostic[order], coords)

    # ------------------------------------------------------------------ pixels
    @cached_property
    def renderer(self) -> CellRenderer:
        """The crop renderer (texture banks seeded by the cohort seed)."""
        return CellRenderer(self.config.crop_size, seed=self.config.seed)

    def site_style(self, site: int) -> SiteStyle:
        """The acquisition style of a site (site 0 is the reference)."""
        if site == 0 or self.config.site_strength == 0:
            return SiteStyle()
        return SiteStyle.sample(np.random.default_rng([self.config.seed, _SITES, site]), self.config.site_strength)

    def patient_style(self, patient: PatientRecord) -> SiteStyle:
        """The site's style with a small per-smear stain variation."""
        site = self.site_style(patient.site)
        rng = np.random.default_rng([self.config.seed, _STYLE, patient.index])
        mix = np.asarray(site.matrix) + rng.normal(0.0, 0.012, 9)
        return SiteStyle(
            matrix=tuple(float(v) for v in mix),
            offset=tuple(float(v) for v in np.asarray(site.offset) + rng.normal(0.0, 0.006, 3)),
            gamma=site.gamma,
            illumination=site.illumination,
            illumination_angle=site.illumination_angle,
            blur=site.blur,
            noise=site.noise,
        )

    def iter_crops(self, patient: PatientRecord, cells: CellTable | None = None):
        """Yield the patient's crops one by one, (S, S, 3) uint8, in cell order."""
        cells = cells if cells is not None else self.cells(patient)
        rng = np.random.default_rng([self.config.seed, _PIXELS, patient.index])
        style = self.patient_style(patient)
        renderer = self.renderer
        for cell_type, diag in zip(cells.cell_type, cells.is_diagnostic, strict=True):
            yield renderer.render(str(cell_type), rng, patient.subtlety if diag else 0.0, style)
        renderer.clear_style_cache()

    def iter_truth(self, patient: PatientRecord, cells: CellTable | None = None, masks: str = "diagnostic"):
        """Yield ``(crop, CellTruth)`` for the patient's cells, in cell order; the crops equal :meth:`iter_crops`'s.

        Args:
            patient: the patient.
            cells: its cell table (drawn when not given).
            masks: which cells keep their masks: ``"diagnostic"``, ``"all"`` or ``"none"``.
        """
        cells = cells if cells is not None else self.cells(patient)
        rng = np.random.default_rng([self.config.seed, _PIXELS, patient.index])
        style = self.patient_style(patient)
        renderer = self.renderer
        for cell_type, diag in zip(cells.cell_type, cells.is_diagnostic, strict=True):
            truth = CellTruth(keep_masks=masks == "all" or (masks == "diagnostic" and bool(diag)))
            crop = renderer.render(str(cell_type), rng, patient.subtlety if diag else 0.0, style, truth=truth)
            yield crop, truth
        renderer.clear_style_cache()

    def render_bag(self, patient: PatientRecord) -> np.ndarray:
        """All crops of a patient as one (n, S, S, 3) uint8 array."""
        size = self.config.crop_size
        out = np.empty((patient.n_cells, size, size, 3), dtype=np.uint8)
        for i, crop in enumerate(self.iter_crops(patient)):
            out[i] = crop
        return out
