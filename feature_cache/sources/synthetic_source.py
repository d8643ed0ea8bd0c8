"""The synthetic cohort as a cell source: crops are re-rendered in memory, no PNG decoding.

``create_source("synthetic", PATH)`` takes a folder written by ``milcore synth`` (its ``synth.json``
holds the configuration) or a JSON/YAML file of :class:`SynthConfig` fields. The cells, ids, types
and coordinates are exactly those of the cohort written to disk (the generator is deterministic),
so a bank extracted this way equals one extracted from the crop folders, minus PNG decoding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from feature_cache.config import read_yaml
from feature_cache.errors import UserError
from feature_cache.sources.base import BagOrigin, BagSource, Cell, CellBatch, digest
from feature_cache.sources.synthetic_cohort import SAMPLING_VERSION, SyntheticCohort
from feature_cache.sources.synthetic_config import SynthConfig


def load_synth_config(path: str | Path) -> SynthConfig:
    """A :class:`SynthConfig` from a cohort folder (``synth.json``) or a JSON/YAML config file."""
    path = Path(path)
    target = path / "synth.json" if path.is_dir() else path
    if not target.exists():
        raise UserError(f"{path}: not a synthetic cohort (no synth.json) nor a config file")
    if target.suffix == ".json":
        try:
            data = json.loads(target.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{target}: unreadable synthetic configuration ({exc})") from exc
    else:
        data = read_yaml(target, what="synthetic configuration", mapping=False)
    if not isinstance(data, dict):
        raise UserError(f"{target}: expected a mapping")
    if data.get("format") == "milcore-synthetic-cohort":
        version = data.get("sampling_version", 1)  # cohorts written before version 2 recorded none
        if version != SAMPLING_VERSION:
            raise UserError(
                f"{target}: cohort drawn with sampling version {version}, this generator draws version "
                f"{SAMPLING_VERSION} (other patients and cells); extract its crops with --source crops, "
                "or write it again with milcore synth"
            )
    return SynthConfig.from_dict(data.get("config", data), where=str(target))  # keys and values checked


class SyntheticSource(BagSource):
    """Bags of the synthetic cohort, rendered on demand.

    Args:
        path: cohort folder (with ``synth.json``) or configuration file.
    """

    kind = "synthetic"

    def __init__(self, path: str | Path, **options: Any) -> None:
        super().__init__()
        if options:
            raise UserError(f"synthetic source takes no options, got {', '.join(sorted(options))}")
        self.path = Path(path)
        self.config = load_synth_config(path)
        self._cohort: SyntheticCohort | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cohort"] = None  # rebuilt lazily in each worker process
        return state

    @property
    def cohort(self) -> SyntheticCohort:
        """The generator (built lazily)."""
        if self._cohort is None:
            self._cohort = SyntheticCohort(self.config)
        return self._cohort

    def bag_ids(self) -> list[str]:
        """Patient ids, sorted."""
        return sorted(p.patient_id for p in self.cohort.patients)

    def _patient(self, bag_id: str):
        try:
            return self.cohort.patient(bag_id)
        except KeyError:
            raise self._unknown_bag(bag_id) from None

    def iter_cells(self, bag_id: str) -> Iterator[Cell]:
        """The patient's cells in file order, with their type and virtual-smear coordinates."""
        patient = self._patient(bag_id)
        cells = self.cohort.cells(patient)
        for cid, ctype, (x, y), crop in zip(cells.cell_ids(), cells.cell_type, cells.coords,
                                            self.cohort.iter_crops(patient, cells), strict=True):  # fmt: skip
            yield Cell(crop, (int(x), int(y)), cid, str(ctype))

    def read_bag(self, bag_id: str) -> CellBatch:
        """The whole bag as one stacked batch (fast path: no per-cell objects)."""
        patient = self._patient(bag_id)
        cells = self.cohort.cells(patient)
        return CellBatch(self.cohort.render_bag(patient), cells.coords.astype("int64"), cells.cell_ids(),
                         [str(t) for t in cells.cell_type])  # fmt: skip

    def origin(self, bag_id: str) -> BagOrigin:
        """The cohort configuration (it decides every cell of every patient)."""
        self._patient(bag_id)
        config = {**self.config.to_dict(), "sampling_version": SAMPLING_VERSION}
        text = json.dumps(config, sort_keys=True, default=str)
        return BagOrigin(self.kind, str(self.path.resolve()), -1, text, digest(bag_id, config), unit="cells")

    def describe(self) -> dict[str, Any]:
        """Kind, path and configuration."""
        return {"kind": self.kind, "path": str(self.path), "config": self.config.to_dict()}
