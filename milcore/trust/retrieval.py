"""Similar-case retrieval: the training patients (and cells) most like a new patient, with their diagnoses.

A hematologist checks a decision against cases they know. The :class:`CaseIndex` of a run holds, for every
fold model, its embeddings of the bags it was trained on (the bag embedding of
:class:`~milcore.models.MILOutput`, the space the classifier decides in), and, for every training patient,
its most characteristic cells: the top-attention cells (attention averaged over the fold models that
trained on the patient) with their features in the encoder's space.

For a patient to explain, each fold model allowed to see it embeds it and finds the most similar training
bags of its own fold (cosine similarity); a training patient's similarity is the mean over the fold models
that compared it. A patient of the run itself is compared only by the fold model that held it out
(``held_out``), so it never retrieves itself and retrieval is as honest as the out-of-fold prediction.
The patient's own top-attention cells are matched against the training patients' characteristic cells.

The index records the encoder fingerprint of the bank it was built on: a query on a bank from another
encoder is refused, as is an index whose fold checkpoints have changed since it was built.
Searches run through :mod:`milcore.trust.search` (exact numpy, or faiss for large indexes).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from feature_cache.errors import UserError
from milcore.trust.search import make_search, normalize

if TYPE_CHECKING:
    import torch

    from milcore.data.store import FeatureStore

log = logging.getLogger(__name__)

INDEX_FILE = "similar_index.h5"
INDEX_FORMAT = "milcore-case-index"
INDEX_VERSION = 1
#: Characteristic cells kept per training patient.
TOP_CELLS = 8
#: Whether bag embeddings are centred per fold before the cosine. Measured on selection seeds 100-102
#: (benchmarks/README.md, issue 16): centring and similarity-weighted votes did not beat the plain count of
#: uncentred neighbours (0.927 vs 0.930), so the default stays uncentred; ``build_index(center=True)`` offers it.
CENTER = False
#: How the retrieved cases vote: ``count`` (ties: summed similarity) or ``similarity`` (summed similarity).
VOTE = "count"
VOTES = ("count", "similarity")


# ----------------------------------------------------------------------------- the models of a run
@dataclass
class FoldModel:
    """One fold model and the bags it was trained and tested on.

    Attributes:
        fold: fold index.
        model: the module (eval mode).
        temperature: its calibration temperature.
        train: the bags it was trained on.
        test: the bags it held out.
        checksum: the checkpoint card's SHA-256 (``"in-memory"`` for a :class:`~milcore.crossval.CVResult`).
    """

    fold: int
    model: torch.nn.Module
    temperature: float
    train: list[str]
    test: list[str]
    checksum: str


@dataclass
class RunModels:
    """The fold models of a run folder or of a cross-validation in memory.

    Attributes:
        folds: one :class:`FoldModel` per fold.
        classes: class names.
        task: label column.
        encoder: the encoder fingerprint the models were trained on (``EncoderInfo.to_dict()``).
        run: the run folder (``None`` in memory).
        bank: the training bank's path (from the run's ``config.yaml``).
        cohort: the training cohort table's path.
    """

    folds: list[FoldModel]
    classes: list[str]
    task: str | None
    encoder: dict[str, Any]
    run: Path | None = None
    bank: str | None = None
    cohort: str | None = None

    def checksums(self) -> dict[str, str]:
        """Fold index (as text) -> checkpoint checksum."""
        return {str(f.fold): f.checksum for f in self.folds}


def run_models(source: Any, device: str = "auto") -> RunModels:
    """The fold models of ``source``: a :class:`~milcore.crossval.CVResult` or a finished run folder.

    Raises:
        UserError: not a run folder, an incomplete run, a damaged checkpoint, checkpoints of several runs.
    """
    from feature_cache.devices import resolve_device

    dev = resolve_device(device)
    if hasattr(source, "folds") and hasattr(source, "classes") and not isinstance(source, str | Path):
        folds = [FoldModel(f.fold.index, f.model.to(dev).eval(), float(f.temperature), list(f.fold.train),
                           list(f.fold.test), "in-memory") for f in source.folds]  # fmt: skip
        return RunModels(folds, list(source.classes), source.task, dict(source.encoder), getattr(source, "out", None))
    from milcore.data.inputs import read_run_config
    from milcore.training.checkpoint import CARD_HASH, load_checkpoint, resolve_checkpoints

    run = Path(source)
    ckset = resolve_checkpoints([run])
    folds, classes, task, encoder = [], None, None, None
    for path in ckset.paths:
        model, card = load_checkpoint(path, dev)
        split = card.get("split") or {}
        if not split.get("train"):
            raise UserError(f"{path}/checkpoint.json: records no training bags (split.train); similar-case "
                            "retrieval needs them")  # fmt: skip
        folds.append(FoldModel(int(split.get("fold", len(folds))), model, float(card.get("temperature", 1.0)),
                               [str(b) for b in split["train"]], [str(b) for b in split.get("test", [])],
                               str(card.get(CARD_HASH, ""))))  # fmt: skip
        classes, task, encoder = card["classes"], card.get("task"), card.get("encoder")
    if not encoder:
        raise UserError(f"{run}: the checkpoints record no encoder fingerprint; an index cannot be checked against "
                        "a bank")  # fmt: skip
    cfg = read_run_config(run, "similar-case retrieval needs the training bank and cohort") or {}
    inputs = cfg.get("inputs") if isinstance(cfg.get("inputs"), dict) else {}
    spec = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
    return RunModels(folds, list(classes or []), task, dict(encoder), run, inputs.get("bank") or spec.get("bank"),
                     inputs.get("cohort") or spec.get("cohort"))  # fmt: skip


def _embed(fm: FoldModel, store: FeatureStore, device: Any, batch_instances: int,
           num_classes: int) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
    """(B, E) bag embeddings and per-bag (n,) attention (heads averaged) of one fold model."""
    from milcore.training.config import TrainConfig
    from milcore.training.trainer import Trainer

    trainer = Trainer(TrainConfig(device=str(device), batch_instances=batch_instances), store.dim, num_classes)
    out = trainer.predict(fm.model, store)
    att = [a if a.ndim == 1 else a.mean(axis=1) for a in out.attention]
    return np.asarray(out.embedding, dtype=np.float32), att


def _cell_ids(bank: Any, bag: str, n: int) -> np.ndarray:
    if "cell_id" in getattr(bank, "columns", ()):
        return np.asarray([str(c) for c in bank.read_column(bag, "cell_id")])
    return np.asarray([str(j) for j in range(n)])


# ----------------------------------------------------------------------------- the index
@dataclass
class CaseIndex:
    """Training bag embeddings per fold model and the training patients' characteristic cells.

    Attributes:
        encoder: fingerprint of the bank the index was built on (``EncoderInfo.to_dict()``).
        classes: class names.
        task: label column.
        patients: (P,) training patients.
        labels: (P,) their class index.
        members: fold -> (n_f,) indices into ``patients`` of the bags the fold model trained on.
        embeddings: fold -> (n_f, E) the fold model's unit-norm embeddings of those bags (centred first
            when ``centers`` holds the fold).
        cell_owner: (M,) index into ``patients`` of each characteristic cell.
        cell_ids: (M,) cell ids (bank ``cell_id`` column, else the row within the bag).
        cell_attention: (M,) relative attention (attention x cells in the bag; 1 = uniform).
        cell_features: (M, D) unit-norm features of the cells in the encoder's space.
        checksums: fold -> checkpoint checksum of the models the index was built from.
        source: where it was built from (run folder, bank, cohort).
        backend: search backend (:data:`milcore.trust.search.BACKENDS`).
        centers: fold -> (E,) mean embedding of the fold's training bags, subtracted from the training and
            the query embeddings before they are normalised (cosine of centred embeddings: the bag embeddings
            of a ReLU MLP are non-negative, so uncentred cosines all crowd near 1). Empty: uncentred (an index
            written before centring existed).
    """

    encoder: dict[str, Any]
    classes: list[str]
    task: str | None
    patients: list[str]
    labels: np.ndarray
    members: dict[int, np.ndarray]
    embeddings: dict[int, np.ndarray]
    cell_owner: np.ndarray
    cell_ids: np.ndarray
    cell_attention: np.ndarray
    cell_features: np.ndarray
    checksums: dict[str, str]
    source: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    centers: dict[int, np.ndarray] = field(default_factory=dict)
    _searches: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.patients)

    def describe(self) -> str:
        """One line: patients, folds, cells."""
        return (f"{len(self.patients)} training patients, {len(self.members)} fold models, "
                f"{len(self.cell_owner)} characteristic cells (encoder {self.encoder.get('name')})")  # fmt: skip

    def check_bank(self, info: Any, where: str) -> None:
        """Refuse a bank whose encoder fingerprint differs from the one the index was built on.

        Raises:
            EncoderMismatchError: naming ``where`` and both encoders.
        """
        from feature_cache.bank import EncoderInfo

        EncoderInfo.from_dict(self.encoder).check_compatible(info, where=f"{where} (similar-case index)")

    def check_models(self, models: RunModels, where: str) -> None:
        """Refuse models other than those the index was built from (a re-trained run: rebuild the index)."""
        if models.checksums() != self.checksums:
            raise UserError(f"{where}: the similar-case index was built from other fold checkpoints than these "
                            f"(folds {sorted(self.checksums)} vs {sorted(models.checksums())}, or re-trained); "
                            "rebuild it (delete it, or pass rebuild=True)")  # fmt: skip

    def search(self, fold: int | str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) similarities and indices into ``members[fold]`` (``fold == "cells"``: into the cell table)."""
        if fold not in self._searches:
            vectors = self.cell_features if fold == "cells" else self.embeddings[int(fold)]
            self._searches[fold] = make_search(np.asarray(vectors, dtype=np.float32), self.backend)
        return self._searches[fold].search(queries, k)

    def query_vectors(self, fold: int, embeddings: np.ndarray) -> np.ndarray:
        """(Q, E) a fold model's embeddings of query bags, centred like the fold's training embeddings."""
        x = np.asarray(embeddings, dtype=np.float32)
        return x - self.centers[fold] if fold in self.centers else x

    def cells_of(self, patient: int, n: int) -> list[tuple[str, float]]:
        """The ``n`` most characteristic cells of a training patient: ``(cell_id, relative attention)``."""
        rows = np.flatnonzero(self.cell_owner == patient)
        rows = rows[np.argsort(-self.cell_attention[rows], kind="stable")][:n]
        return [(str(self.cell_ids[r]), float(self.cell_attention[r])) for r in rows]

    # --------------------------------------------------------------- storage
    def save(self, path: str | Path) -> Path:
        """Write the index to an HDF5 file (through a temporary file and a rename)."""
        import h5py

        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        strings = h5py.string_dtype()
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = INDEX_FORMAT
                f.attrs["format_version"] = INDEX_VERSION
                f.attrs["meta"] = json.dumps({"encoder": self.encoder, "classes": self.classes, "task": self.task,
                                              "checksums": self.checksums, "source": self.source}, default=str)
                f.create_dataset("patients", data=np.asarray(self.patients, dtype=object), dtype=strings)
                f.create_dataset("labels", data=np.asarray(self.labels, dtype=np.int64))
                for k in sorted(self.members):
                    g = f.create_group(f"folds/{k}")
                    g.create_dataset("members", data=np.asarray(self.members[k], dtype=np.int64))
                    g.create_dataset("embeddings", data=np.asarray(self.embeddings[k], dtype=np.float32))
                    if k in self.centers:
                        g.create_dataset("center", data=np.asarray(self.centers[k], dtype=np.float32))
                c = f.create_group("cells")
                c.create_dataset("owner", data=np.asarray(self.cell_owner, dtype=np.int64))
                c.create_dataset("cell_id", data=np.asarray([str(x) for x in self.cell_ids], dtype=object),
                                 dtype=strings)  # fmt: skip
                c.create_dataset("attention", data=np.asarray(self.cell_attention, dtype=np.float32))
                c.create_dataset("features", data=np.asarray(self.cell_features, dtype=np.float16))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto") -> CaseIndex:
        """Read an index written by :meth:`save`.

        Raises:
            UserError: not an index file, another format version, unreadable or inconsistent content.
        """
        import h5py

        path = Path(path)
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != INDEX_FORMAT:
                    raise UserError(f"{path}: not a milcore similar-case index")
                if int(f.attrs.get("format_version", -1)) != INDEX_VERSION:
                    raise UserError(f"{path}: index format version {f.attrs.get('format_version')} (this milcore "
                                    f"reads {INDEX_VERSION}); rebuild it")  # fmt: skip
                meta = json.loads(f.attrs["meta"])
                patients = [p.decode() if isinstance(p, bytes) else str(p) for p in f["patients"][:]]
                members = {int(k): f[f"folds/{k}/members"][:] for k in f["folds"]}
                embeddings = {int(k): f[f"folds/{k}/embeddings"][:] for k in f["folds"]}
                centers = {int(k): f[f"folds/{k}/center"][:] for k in f["folds"] if "center" in f[f"folds/{k}"]}
                cells = f["cells"]
                index = cls(meta["encoder"], list(meta["classes"]), meta.get("task"), patients, f["labels"][:],
                            members, embeddings, cells["owner"][:],
                            np.asarray([c.decode() if isinstance(c, bytes) else str(c) for c in cells["cell_id"][:]]),
                            cells["attention"][:], cells["features"][:].astype(np.float32),
                            dict(meta.get("checksums", {})), dict(meta.get("source", {})), backend,
                            centers)  # fmt: skip
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise UserError(f"{path}: unreadable similar-case index ({exc})") from exc
        bad = [k for k in members if len(members[k]) != len(embeddings[k]) or
               (len(members[k]) and members[k].max() >= len(patients)) or
               (k in centers and centers[k].shape != embeddings[k].shape[1:])]  # fmt: skip
        if bad or len(index.labels) != len(patients) or (len(index.cell_owner) and
                                                         index.cell_owner.max() >= len(patients)):  # fmt: skip
            raise UserError(f"{path}: inconsistent similar-case index (folds {bad or 'ok'}); rebuild it")
        return index


def build_index(source: Any, data: FeatureStore | None = None, *, top_cells: int = TOP_CELLS, device: str = "auto",
                backend: str = "auto", batch_instances: int = 16384, center: bool = CENTER) -> CaseIndex:  # fmt: skip
    """Build the similar-case index of a run: each fold model's embeddings of its training bags, and every
    training patient's ``top_cells`` highest-attention cells.

    Args:
        source: a finished run folder, or a :class:`~milcore.crossval.CVResult` (then ``data`` is required).
        data: the labelled bags the run was trained on (default: the run's bank and cohort, from its
            ``config.yaml``).
        top_cells: characteristic cells kept per training patient.
        device: where the fold models embed.
        backend: search backend of the returned index.
        batch_instances: cells per forward pass.
        center: compare centred embeddings (each fold's training mean subtracted; :attr:`CaseIndex.centers`).

    Raises:
        UserError: the bank's encoder differs from the models' (refused), the bank lacks training bags, no
            labels.
    """
    from feature_cache.bank import EncoderInfo
    from feature_cache.devices import resolve_device

    models = run_models(source, device)
    dev = resolve_device(device)
    if data is None:
        if models.bank is None or models.cohort is None or models.task is None:
            raise UserError(f"{source}: cannot tell the bank, cohort and task the run was trained on (no config.yaml)")
        from milcore.data.store import open_bags

        if not Path(models.bank).exists():
            raise UserError(f"{models.bank}: the run's training bank is not there (moved?); build the index with "
                            "build_index(run, data=open_bags(BANK, COHORT, task))")  # fmt: skip
        data = open_bags(models.bank, models.cohort, models.task)
    where = str(getattr(data.bank, "path", "the bank"))
    EncoderInfo.from_dict(models.encoder).check_compatible(data.bank.info, where=where)
    labels = data.require_labels("a similar-case index")
    label_of = dict(zip(data.bag_ids, labels.tolist(), strict=True))
    trained = {b for fm in models.folds for b in fm.train}
    missing = sorted(trained - set(label_of))
    if missing:
        raise UserError(f"{where}: {len(missing)} of the run's training bags are not among these labelled bags (e.g. "
                        f"{', '.join(missing[:3])}); is this the bank and cohort the run was trained on?")  # fmt: skip
    patients = [b for b in data.bag_ids if b in trained]
    pos = {b: i for i, b in enumerate(patients)}
    members, embeddings, centers = {}, {}, {}
    att_sum: dict[str, np.ndarray] = {}
    att_count: Counter[str] = Counter()
    for fm in models.folds:
        emb, att = _embed(fm, data.view(fm.train), dev, batch_instances, len(models.classes))
        members[fm.fold] = np.asarray([pos[b] for b in fm.train], dtype=np.int64)
        if center:
            centers[fm.fold] = emb.mean(axis=0).astype(np.float32)  # (E,)
            emb = emb - centers[fm.fold]
        embeddings[fm.fold] = normalize(emb)
        for b, a in zip(fm.train, att, strict=True):
            att_sum[b] = att_sum[b] + a if b in att_sum else a.astype(np.float64)
            att_count[b] += 1
    owner, cell_ids, cell_att, feats = [], [], [], []
    for i, b in enumerate(patients):
        a = att_sum[b] / att_count[b]  # (n,) mean attention of the fold models that trained on b
        top = np.argsort(-a, kind="stable")[:top_cells]
        x = np.asarray(data.bank.read(b), dtype=np.float32)[top]  # (t, D)
        ids = _cell_ids(data.bank, b, len(a))
        owner += [i] * len(top)
        cell_ids += [str(ids[j]) for j in top]
        cell_att += (a[top] * len(a)).tolist()
        feats.append(x)
    features = normalize(np.concatenate(feats)) if feats else np.zeros((0, data.dim), np.float32)
    index = CaseIndex(dict(models.encoder), list(models.classes), models.task, patients,
                      np.asarray([label_of[b] for b in patients], dtype=np.int64), members, embeddings,
                      np.asarray(owner, dtype=np.int64), np.asarray(cell_ids), np.asarray(cell_att, dtype=np.float32),
                      features, models.checksums(),
                      {"run": str(models.run) if models.run else None, "bank": where,
                       "cohort": str(getattr(data.cohort, "path", "")) or None, "top_cells": top_cells},
                      backend, centers)  # fmt: skip
    log.info("similar-case index: %s", index.describe())
    return index


def index_for_run(run: str | Path, *, rebuild: bool = False, device: str = "auto", backend: str = "auto",
                  top_cells: int = TOP_CELLS) -> tuple[CaseIndex, RunModels]:  # fmt: skip
    """The run's similar-case index (``RUN/similar_index.h5``: built and stored on first use) and its models.

    A stored index is rebuilt when the run's checkpoints changed or ``rebuild``; it is refused (rebuild
    it) when the training bank now carries another encoder.
    """
    run = Path(run)
    models = run_models(run, device)
    path = run / INDEX_FILE
    if path.exists() and not rebuild:
        index = CaseIndex.load(path, backend)
        try:
            index.check_models(models, str(path))
        except UserError as exc:
            log.warning("%s; rebuilding it", exc)
        else:
            if bool(index.centers) == CENTER:
                return index, models
            log.warning("%s: built with%s centred embeddings; rebuilding it", path, "out" if CENTER else "")
    index = build_index(run, device=device, backend=backend, top_cells=top_cells)
    try:
        index.save(path)
        log.info("similar-case index written: %s", path)
    except OSError as exc:
        log.warning("%s: cannot store the similar-case index (%s); it is rebuilt next time", path, exc)
    return index, models


# ----------------------------------------------------------------------------- queries
@dataclass
class SimilarCase:
    """A retrieved training patient.

    Attributes:
        bag_id: the training patient.
        label: its diagnosis.
        similarity: mean cosine similarity over the fold models that compared it.
        models: how many fold models compared it.
        cells: its most characteristic cells, ``(cell_id, relative attention)``.
    """

    bag_id: str
    label: str
    similarity: float
    models: int
    cells: list[tuple[str, float]]


@dataclass
class CellMatch:
    """A cell of the patient and the most similar characteristic cells of training patients.

    Attributes:
        cell_id: the patient's cell.
        attention: its relative attention.
        matches: ``{"bag_id", "cell_id", "label", "similarity"}`` of the closest training cells.
    """

    cell_id: str
    attention: float
    matches: list[dict[str, Any]]


@dataclass
class CaseMatches:
    """The similar cases of one patient."""

    bag_id: str
    cases: list[SimilarCase]
    cells: list[CellMatch]
    folds: list[int]

    def majority(self, vote: str = VOTE) -> str | None:
        """The diagnosis the retrieved cases vote for.

        Args:
            vote: ``count``: the most frequent diagnosis (ties: the larger summed similarity); ``similarity``:
                the largest summed similarity, each case weighing ``(1 + cosine) / 2`` (distance-weighted
                k-NN, Dudani 1976).
        """
        if vote not in VOTES:
            raise ValueError(f"vote {vote!r}: choose from {', '.join(VOTES)}")
        if not self.cases:
            return None
        votes: dict[str, list[float]] = {}
        for c in self.cases:
            v = votes.setdefault(c.label, [0, 0.0])
            v[0] += 1
            v[1] += (1.0 + c.similarity) / 2.0
        if vote == "similarity":
            return max(votes, key=lambda lab: (votes[lab][1], votes[lab][0]))
        return max(votes, key=lambda lab: (votes[lab][0], votes[lab][1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"bag_id": self.bag_id, "majority": self.majority(), "folds": self.folds,
                "cases": [{"bag_id": c.bag_id, "label": c.label, "similarity": c.similarity, "models": c.models,
                           "cells": [[cid, a] for cid, a in c.cells]} for c in self.cases],
                "cells": [{"cell_id": m.cell_id, "attention": m.attention, "matches": m.matches}
                          for m in self.cells]}  # fmt: skip


def similar_cases(index: CaseIndex, models: RunModels | Any, bags: FeatureStore, *, k: int = 5,
                  held_out: dict[str, int] | None = None, query_cells: int = 4, cell_matches: int = 3,
                  cells_per_case: int = 4, device: str = "auto",
                  batch_instances: int = 16384) -> list[CaseMatches]:  # fmt: skip
    """The ``k`` most similar training patients of every bag of ``bags``, and matches of its top cells.

    Args:
        index: the run's :class:`CaseIndex`.
        models: the run's fold models (those the index was built from): :class:`RunModels`, or the run folder
            or :class:`~milcore.crossval.CVResult` they come from.
        bags: the patients to explain (a store over any bank with the index's encoder).
        k: training patients per patient.
        held_out: bag -> the fold that held it out (patients of the run itself): only that fold model and the
            bags it trained on are used. Bags absent from it are compared by every fold model.
        query_cells: the patient's top-attention cells matched against the training cells.
        cell_matches: training cells per matched cell.
        cells_per_case: characteristic cells listed per retrieved patient.
        device: where the fold models embed.
        batch_instances: cells per forward pass.

    Raises:
        EncoderMismatchError: ``bags`` come from a bank of another encoder (refused).
        UserError: models other than the index's, ``k`` < 1.
    """
    from feature_cache.devices import resolve_device

    if k < 1:
        raise UserError(f"similar cases: k must be at least 1, got {k}")
    if not isinstance(models, RunModels):
        models = run_models(models, device)
    where = str(getattr(bags.bank, "path", "the bank"))
    index.check_bank(bags.bank.info, where)
    index.check_models(models, where)
    dev = resolve_device(device)
    held_out = held_out or {}
    by_fold = {fm.fold: fm for fm in models.folds}
    bad = sorted({f for b, f in held_out.items() if b in set(bags.bag_ids) and f not in by_fold})
    if bad:
        raise UserError(f"held-out folds {bad} have no model in {models.run or 'these models'}")
    sims: list[dict[int, list[float]]] = [dict() for _ in bags.bag_ids]
    att_sum: list[np.ndarray | None] = [None] * len(bags.bag_ids)
    used: list[list[int]] = [[] for _ in bags.bag_ids]
    for fold, fm in sorted(by_fold.items()):
        rows = [i for i, b in enumerate(bags.bag_ids) if held_out.get(b, fold) == fold]
        if not rows:
            continue
        emb, att = _embed(fm, bags.view([bags.bag_ids[i] for i in rows]), dev, batch_instances, len(models.classes))
        emb = index.query_vectors(fold, emb)
        n_f = len(index.members[fold])
        s, idx = index.search(fold, emb, min(n_f, max(4 * k, 64)))
        for j, i in enumerate(rows):
            used[i].append(fold)
            att_sum[i] = att[j].astype(np.float64) if att_sum[i] is None else att_sum[i] + att[j]
            for sim, m in zip(s[j], idx[j], strict=True):
                if m >= 0:
                    sims[i].setdefault(int(index.members[fold][m]), []).append(float(sim))
    results = []
    for i, b in enumerate(bags.bag_ids):
        ranked = sorted(((float(np.mean(v)), len(v), p) for p, v in sims[i].items()), key=lambda t: (-t[0], t[2]))
        cases = [SimilarCase(index.patients[p], index.classes[int(index.labels[p])], s, n,
                             index.cells_of(p, cells_per_case)) for s, n, p in ranked[:k]]  # fmt: skip
        allowed = None
        if b in held_out:  # the cells of the patients its fold model trained on
            allowed = set(index.members[held_out[b]].tolist())
        cells = _match_cells(index, bags, b, att_sum[i] / max(len(used[i]), 1) if att_sum[i] is not None else None,
                             query_cells, cell_matches, allowed)  # fmt: skip
        results.append(CaseMatches(b, cases, cells, used[i]))
    return results


def _match_cells(index: CaseIndex, bags: FeatureStore, bag: str, attention: np.ndarray | None, n_query: int,
                 n_match: int, allowed: set[int] | None) -> list[CellMatch]:  # fmt: skip
    """The patient's top-attention cells and their closest training cells."""
    if attention is None or not len(index.cell_owner) or n_query < 1 or n_match < 1:
        return []
    top = np.argsort(-attention, kind="stable")[:n_query]
    x = np.asarray(bags.bank.read(bag), dtype=np.float32)[top]  # (q, D)
    ids = _cell_ids(bags.bank, bag, len(attention))
    want = n_match if allowed is None else min(len(index.cell_owner), n_match * 8 + 32)
    s, idx = index.search("cells", x, want)
    out = []
    for j, row in enumerate(top):
        matches = []
        for sim, m in zip(s[j], idx[j], strict=True):
            if m < 0 or (allowed is not None and int(index.cell_owner[m]) not in allowed):
                continue
            p = int(index.cell_owner[m])
            matches.append({"bag_id": index.patients[p], "cell_id": str(index.cell_ids[m]),
                            "label": index.classes[int(index.labels[p])], "similarity": float(sim)})  # fmt: skip
            if len(matches) == n_match:
                break
        out.append(CellMatch(str(ids[row]), float(attention[row] * len(attention)), matches))
    return out


def majority_votes(matches: Sequence[CaseMatches]) -> dict[str, str | None]:
    """Bag -> majority diagnosis of its retrieved cases."""
    return {m.bag_id: m.majority() for m in matches}
