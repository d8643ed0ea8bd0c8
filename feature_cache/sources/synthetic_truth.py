"""Per-cell ground truth of a synthetic cohort beyond ``cells.csv``: the diagnostic-feature masks.

``masks.h5`` (written by :func:`~feature_cache.sources.synthetic.write_cohort` beside ``cells.csv``)
holds, for every diagnostic cell, the mask of its diagnostic feature (Auer rod, granules, nucleus,
or the whole red cell; see :mod:`~feature_cache.sources.synthetic_attributes`) and the mask of the
cell body, on the crop's pixel grid::

    attrs   format = "milcore-synthetic-masks", format_version = 1, crop_size = S
    bag_id  (M,) str     patient id
    cell_id (M,) str     cell id (crop file stem)
    feature (M,) str     auer_rod | granules | nucleus | cell
    mask    (M, S, S) uint8   1 inside the diagnostic feature
    cell    (M, S, S) uint8   1 inside the cell body

:func:`cohort_masks` reads it, or re-renders the requested patients from ``synth.json`` when the
cohort was written before masks existed (the generator is deterministic, so the masks are those of
the crops on disk).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feature_cache.errors import UserError

MASKS_FILE = "masks.h5"
MASKS_FORMAT = "milcore-synthetic-masks"
MASKS_VERSION = 1


@dataclass(frozen=True)
class FeatureMask:
    """The diagnostic feature of one cell.

    Attributes:
        feature: ``auer_rod``, ``granules``, ``nucleus`` or ``cell``.
        mask: (S, S) bool, inside the feature.
        cell: (S, S) bool, inside the cell body.
    """

    feature: str
    mask: np.ndarray
    cell: np.ndarray


MaskTable = dict[tuple[str, str], FeatureMask]


def write_masks(path: str | Path, masks: MaskTable, crop_size: int) -> None:
    """Write ``masks.h5`` (see the module docstring); keys ``(bag_id, cell_id)`` in sorted order."""
    import h5py

    keys = sorted(masks)
    s = int(crop_size)
    with h5py.File(path, "w") as f:
        f.attrs.update(format=MASKS_FORMAT, format_version=MASKS_VERSION, crop_size=s)
        text = h5py.string_dtype()
        f.create_dataset("bag_id", data=np.asarray([k[0] for k in keys], dtype=object), dtype=text)
        f.create_dataset("cell_id", data=np.asarray([k[1] for k in keys], dtype=object), dtype=text)
        f.create_dataset("feature", data=np.asarray([masks[k].feature for k in keys], dtype=object), dtype=text)
        for name, attr in (("mask", "mask"), ("cell", "cell")):
            data = np.zeros((len(keys), s, s), dtype=np.uint8)
            for i, k in enumerate(keys):
                data[i] = getattr(masks[k], attr)
            f.create_dataset(name, data=data, chunks=(1, s, s) if keys else None, compression="gzip",
                             compression_opts=4)  # fmt: skip


def read_masks(path: str | Path, bag_ids: Iterable[str] | None = None) -> MaskTable:
    """Read ``masks.h5`` (all bags, or only ``bag_ids``).

    Raises:
        UserError: not a masks file of this format, or unreadable.
    """
    import h5py

    path = Path(path)
    wanted = set(bag_ids) if bag_ids is not None else None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != MASKS_FORMAT:
                raise UserError(f"{path}: not a synthetic masks file (format {f.attrs.get('format')!r})")
            if int(f.attrs.get("format_version", -1)) != MASKS_VERSION:
                raise UserError(f"{path}: masks format version {f.attrs.get('format_version')} is not "
                                f"{MASKS_VERSION}")  # fmt: skip
            bags = [b.decode() if isinstance(b, bytes) else str(b) for b in f["bag_id"][:]]
            cells = [c.decode() if isinstance(c, bytes) else str(c) for c in f["cell_id"][:]]
            feats = [c.decode() if isinstance(c, bytes) else str(c) for c in f["feature"][:]]
            rows = [i for i, b in enumerate(bags) if wanted is None or b in wanted]
            mask = f["mask"][rows] if rows else np.zeros((0, 1, 1), np.uint8)
            body = f["cell"][rows] if rows else np.zeros((0, 1, 1), np.uint8)
    except OSError as exc:
        raise UserError(f"{path}: unreadable masks file ({exc})") from None
    return {(bags[i], cells[i]): FeatureMask(feats[i], mask[j].astype(bool), body[j].astype(bool))
            for j, i in enumerate(rows)}  # fmt: skip


def render_masks(config, bag_ids: Iterable[str], union: bool = False) -> MaskTable:
    """The diagnostic-feature masks of some patients, re-rendered from a :class:`SynthConfig`.

    Args:
        config: the cohort's :class:`SynthConfig`.
        bag_ids: the patients.
        union: the mask is the union of every diagnostic feature the cell carries (a myeloblast's Auer rod
            and its nucleus) instead of the first one's (what ``masks.h5`` stores).
    """
    from feature_cache.sources.synthetic_attributes import DIAGNOSTIC_FEATURES
    from feature_cache.sources.synthetic_cohort import SyntheticCohort

    cohort = SyntheticCohort(config)
    out: MaskTable = {}
    for bag in bag_ids:
        patient = cohort.patient(bag)
        cells = cohort.cells(patient)
        if not cells.is_diagnostic.any():
            continue
        for cid, ctype, diag, (_, truth) in zip(cells.cell_ids(), cells.cell_type, cells.is_diagnostic,
                                                cohort.iter_truth(patient, cells), strict=True):  # fmt: skip
            feature = truth.diagnostic_feature(str(ctype)) if diag else None
            if feature is None:
                continue
            mask = truth.masks[feature]
            if union:
                names = [n for n in DIAGNOSTIC_FEATURES.get(str(ctype), ("cell",)) if n in truth.masks]
                mask = np.any([np.asarray(truth.masks[n], dtype=bool) for n in names], axis=0)
            out[(bag, cid)] = FeatureMask(feature, mask, truth.masks["cell"])
    return out


def cohort_masks(folder: str | Path, bag_ids: Iterable[str]) -> MaskTable:
    """The diagnostic-feature masks of a cohort folder's patients: ``masks.h5``, else re-rendered.

    Args:
        folder: a cohort folder written by ``milcore synth`` (``synth.json``).
        bag_ids: the patients wanted (ids not in the cohort are skipped).

    Raises:
        UserError: the folder is not a synthetic cohort, or its masks file is damaged.
    """
    from feature_cache.sources.synthetic_source import load_synth_config

    folder = Path(folder)
    bag_ids = list(bag_ids)
    if (folder / MASKS_FILE).is_file():
        return read_masks(folder / MASKS_FILE, bag_ids)
    config = load_synth_config(folder)
    from feature_cache.sources.synthetic_cohort import SyntheticCohort

    known = {p.patient_id for p in SyntheticCohort(config).patients}
    return render_masks(config, [b for b in bag_ids if b in known])
