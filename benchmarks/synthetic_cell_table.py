"""Write a synthetic cohort's cells as an encoder-training table: ``path,label[,<attribute columns>]``.

``label`` is each cell's type (``cells.csv``'s ``cell_type``); ``--attributes all`` adds every WBCAtt-style
attribute the generator records for the cohort's lineage (``ATTRIBUTE_COLUMNS``), for ``milcore encoder train
--attributes``. Paths are absolute (the crops stay in the cohort).

    python benchmarks/synthetic_cell_table.py /tmp/d16/px/c1/cohort enc_train.csv                # cell types
    python benchmarks/synthetic_cell_table.py /tmp/d16/px/c1/cohort enc_attr.csv --attributes all
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def write_table(cohort: Path, out: Path, attributes: str = "") -> tuple[int, list[str]]:
    """Write the table; ``(cells, attribute columns)``.

    Raises:
        SystemExit: no ``cells.csv``, an unknown attribute, or a cell without its crop.
    """
    from feature_cache.sources.synthetic_attributes import ATTRIBUTE_COLUMNS

    table = cohort / "cells.csv"
    if not table.is_file():
        raise SystemExit(f"{table}: not found (a cohort written by milcore synth)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    known = list(dict.fromkeys(c for cols in ATTRIBUTE_COLUMNS.values() for c in cols if rows and c in rows[0]))
    wanted = known if attributes == "all" else [a for a in attributes.split(",") if a]
    unknown = [a for a in wanted if a not in known]
    if unknown:
        raise SystemExit(f"{table}: no attribute column {', '.join(unknown)} (has: {', '.join(known)})")
    lines = []
    for r in rows:
        crop = cohort / r["patient_id"] / f"{r['cell_id']}.png"
        if not crop.is_file():
            raise SystemExit(f"{crop}: crop of {r['patient_id']}/{r['cell_id']} not found")
        lines.append([str(crop.resolve()), r["cell_type"], *(r[a] for a in wanted)])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", *wanted], *lines])
    return len(lines), wanted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cohort", help="a cohort folder written by milcore synth")
    p.add_argument("out", help="the table to write (.csv)")
    p.add_argument("--attributes", default="", help="attribute columns to add: all, or A,B,...")
    args = p.parse_args()
    n, cols = write_table(Path(args.cohort), Path(args.out), args.attributes)
    print(f"{args.out}: {n} cells, label = cell type, attributes: {', '.join(cols) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
