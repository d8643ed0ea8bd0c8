"""Instance-level ground truth (``cells.csv``: which cells are diagnostic) aligned with bank rows.

How well attention ranks these cells is :func:`milcore.metrics.classification.instance_auroc`.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from feature_cache.errors import UserError

log = logging.getLogger(__name__)


def load_cell_truth(cells_csv: str | Path, bank, bag_ids: list[str]) -> dict[str, np.ndarray]:
    """Per bag, a (n,) bool array aligned with the bank's rows: True for diagnostic cells.

    Args:
        cells_csv: table with ``patient_id`` (or ``bag_id``), ``cell_id`` and ``is_diagnostic`` columns.
        bank: a bank reader with a ``cell_id`` column.
        bag_ids: bags to align.

    Raises:
        UserError: unreadable table, missing columns, or a bank without cell ids.
    """
    path = Path(cells_csv)
    if not path.exists():
        raise UserError(f"{path}: instance ground-truth table not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        bag_col = "patient_id" if "patient_id" in cols else "bag_id" if "bag_id" in cols else None
        if bag_col is None or "cell_id" not in cols or "is_diagnostic" not in cols:
            raise UserError(f"{path}: needs columns patient_id (or bag_id), cell_id and is_diagnostic")
        truth = {(r[bag_col], r["cell_id"]): r["is_diagnostic"] in ("1", "true", "True") for r in reader}
    if "cell_id" not in bank.columns:
        raise UserError(f"{bank.path}: the bank stores no cell ids, so cells cannot be matched to {path.name}")
    out = {}
    missing = 0
    for b in bag_ids:
        ids = bank.read_column(b, "cell_id")
        flags = [truth.get((b, str(c))) for c in ids]
        missing += sum(v is None for v in flags)
        out[b] = np.asarray([bool(v) for v in flags], dtype=bool)
    if missing:
        log.warning("%s: %d bank cells have no ground-truth row (counted as non-diagnostic)", path, missing)
    return out
