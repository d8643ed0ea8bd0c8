"""Data for a continual run: a bank and cohort table given in the config, or synthetic cohorts made here.

``data: {synthetic: {...}}`` generates each synthetic cohort in memory (no crops written), extracts its
features with a cheap encoder (``morphology`` by default), merges the banks, and writes one cohort
table whose label column maps each cohort's classes to the stream's class names (unmapped classes are
dropped), e.g. AML, ALL and anemia combined into one class-incremental stream. Everything lands in
``OUT/data/`` and is reused when its recipe (``prepare.json``) is unchanged.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from milcore.continual.config import ContinualData, SyntheticData

log = logging.getLogger(__name__)

COLUMNS = ("bag_id", "{label}", "source_task", "source_label", "site", "date", "age", "sex", "patient")


def prepare_data(data: ContinualData | Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Resolve (or build) the run's bank and cohort table.

    Args:
        data: the config's ``data`` (or its mapping).
        out: the run folder.

    Returns:
        ``(bank path, cohort path)``.
    """
    if not isinstance(data, ContinualData):
        data = ContinualData.from_dict(data, where="data")  # bank and cohort, or a synthetic recipe
    if data.synthetic is None:
        return Path(str(data.bank)), Path(str(data.cohort))
    return _synthetic(data.synthetic, data.label, out / "data")


def _synthetic(recipe: SyntheticData, label: str, folder: Path) -> tuple[Path, Path]:
    from feature_cache.bank.merge import merge_banks
    from feature_cache.extract import ExtractConfig, extract
    from feature_cache.sources.synthetic import SynthConfig, SyntheticCohort
    from feature_cache.sources.synthetic_source import load_synth_config

    cohorts, encoder, relabel = recipe.cohorts, recipe.encoder, recipe.relabel
    bank, table, stamp = folder / "bank.h5", folder / "cohort.csv", folder / "prepare.json"
    wanted = {"recipe": recipe.to_dict(), "label": label}
    if bank.exists() and table.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        log.info("reusing the prepared data in %s", folder)
        return bank, table
    folder.mkdir(parents=True, exist_ok=True)
    shards, rows = [], []
    for k, spec in enumerate(cohorts):
        spec = dict(spec)
        name = str(spec.pop("name", spec.get("task", f"cohort{k}")))
        cfg_path, shard = folder / f"{name}.json", folder / f"{name}.h5"
        text = json.dumps({"config": spec, "encoder": encoder})
        same = cfg_path.exists() and cfg_path.read_text() == text  # an unchanged cohort resumes / is reused
        cfg_path.write_text(text)
        config: SynthConfig = load_synth_config(cfg_path)  # validates the fields, one-line errors
        extract(ExtractConfig(source="synthetic", input=str(cfg_path), encoder=encoder, out=str(shard),
                              num_workers=recipe.workers, overwrite=not same))  # fmt: skip
        shards.append(shard)
        mapping = relabel.get(name, relabel.get(config.task))
        for p in SyntheticCohort(config).patients:
            cls = p.label if mapping is None else mapping.get(p.label)
            if cls is None:
                continue
            rows.append([p.patient_id, cls, config.task, p.label, p.site, p.date, p.age, p.sex, p.patient_id])
    merge_banks(shards, bank, overwrite=True)
    tmp = table.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c.format(label=label) for c in COLUMNS])
        writer.writerows(rows)
    tmp.replace(table)
    stamp.write_text(json.dumps(wanted, indent=2))
    log.info("prepared %d bags in %s (%s features)", len(rows), folder, encoder)
    return bank, table
