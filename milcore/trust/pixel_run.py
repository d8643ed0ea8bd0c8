"""Pixel explanations of a run's (or a prediction folder's) top-attention cells, scored where masks exist.

:func:`explain_pixels` finds, for each patient, the model that predicted it (the fold model of a
training run's out-of-fold prediction; every checkpoint of a ``milcore predict`` ensemble, logits
averaged), rebuilds the bank's encoder (:func:`rebuild_encoder`: refused unless its fingerprint equals
the bank's), reads the top-attention cells' crops, checks that each crop re-encodes to its bank row,
and computes the maps of :mod:`milcore.trust.pixels`. When the crops are a synthetic cohort, the
diagnostic cells' feature masks (``masks.h5``, or re-rendered) score each map with the pointing game.

Nothing here raises for a missing ingredient: no crops, no cell ids, an encoder that cannot be
rebuilt or has no gradient, no checkpoint: each is a note saying what was skipped and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import UserError
from milcore.trust.pixels import METHOD_LABELS, PixelConfig, Pointing

log = logging.getLogger(__name__)

#: Fingerprint fields that must agree between a rebuilt encoder and the bank.
FINGERPRINT = ("name", "version", "weights_sha256", "transform", "dim")


@dataclass
class CellPixels:
    """The pixel explanation of one cell.

    Attributes:
        bag_id, cell_id: the cell.
        row: its row in the bag.
        attention: its attention.
        target: the class whose logit is explained.
        crop: (h, w, 3) uint8 pixels.
        maps: method -> (h, w) map on the crop grid.
        pointing: method -> pointing game (only for cells with a ground-truth mask).
        feature: the ground-truth mask's feature (``auer_rod``, ``nucleus``...) or ``None``.
        mask: (h, w) bool ground-truth mask or ``None``.
        completeness_error: integrated gradients' completeness error (``None`` without IG).
    """

    bag_id: str
    cell_id: str
    row: int
    attention: float
    target: int
    crop: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    pointing: dict[str, Pointing] = field(default_factory=dict)
    feature: str | None = None
    mask: np.ndarray | None = None
    completeness_error: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: peaks, hits, distances (no pixels)."""
        from milcore.trust.pixels import peak

        methods = {}
        for m, sal in self.maps.items():
            entry: dict[str, Any] = {"peak": list(peak(sal)) if float(sal.max()) > 0 else None}
            if m in self.pointing:
                pt = self.pointing[m]
                entry.update(hit=pt.hit, distance_px=round(pt.distance, 2))
            methods[m] = entry
        out: dict[str, Any] = {"cell_id": self.cell_id, "row": self.row, "attention": self.attention,
                               "feature": self.feature, "methods": methods}  # fmt: skip
        if self.completeness_error is not None:
            out["ig_completeness_error"] = round(self.completeness_error, 4)
        return out


@dataclass
class PixelExplanations:
    """What :func:`explain_pixels` produced.

    Attributes:
        cells: the explained cells, patient by patient.
        notes: what was skipped and why (one line each).
        encoder: the encoder's name (``None`` when it could not be rebuilt).
        layer: the Grad-CAM layer (``None`` without Grad-CAM).
        config: the settings.
    """

    cells: list[CellPixels]
    notes: list[str]
    encoder: str | None
    layer: str | None
    config: PixelConfig

    def by_bag(self) -> dict[str, list[CellPixels]]:
        """Cells grouped by patient, in order."""
        out: dict[str, list[CellPixels]] = {}
        for c in self.cells:
            out.setdefault(c.bag_id, []).append(c)
        return out

    def pointing_summary(self) -> dict[str, Any]:
        """Per method: hits / scored cells (overall and per feature), the two chance levels, the relevance mass and
        its chance level."""
        return pointing_summary(self.cells, self.config.methods)

    def to_json(self) -> dict[str, Any]:
        """The ``pixels`` section of ``explain.json``."""
        return {"methods": list(self.config.methods), "encoder": self.encoder, "gradcam_layer": self.layer,
                "target": self.config.target, "score": self.config.score,
                "tolerance_px": self.config.tolerance, "cells_per_patient": self.config.cells_per_patient,
                "ig_steps": self.config.ig_steps, "notes": self.notes,
                "pointing_game": self.pointing_summary()}  # fmt: skip


def pointing_summary(cells: list[CellPixels], methods: tuple[str, ...]) -> dict[str, Any]:
    """Pointing-game accuracy per method over the cells that have a mask, overall and per feature."""
    out: dict[str, Any] = {}
    for m in methods:
        scored = [c for c in cells if m in c.pointing]
        if not scored:
            continue
        per: dict[str, list[Pointing]] = {}
        for c in scored:
            per.setdefault(c.feature or "?", []).append(c.pointing[m])

        def stats(points: list[Pointing]) -> dict[str, Any]:
            return {"cells": len(points), "hits": int(sum(p.hit for p in points)),
                    "accuracy": float(np.mean([p.hit for p in points])),
                    "empty_maps": int(sum(p.empty for p in points)),
                    "chance_centre": float(np.mean([p.chance_centre for p in points])),
                    "chance_random_point": float(np.mean([p.chance_cell for p in points])),
                    "mass": float(np.mean([p.mass for p in points])),
                    "mass_chance": float(np.mean([p.mass_chance for p in points]))}  # fmt: skip

        out[m] = {**stats([c.pointing[m] for c in scored]), "by_feature": {f: stats(p) for f, p in sorted(per.items())}}
    return out


def rebuild_encoder(info: Any, device: str = "cpu", weights: str | Path | None = None) -> tuple[Any, str | None]:
    """The bank's encoder rebuilt on this machine, or ``(None, why not)``.

    Tries the encoder's defaults, then the ``image_size`` its transform records; the rebuilt encoder's
    fingerprint (name, version, weights SHA-256, transform, dimension) must equal the bank's.

    Args:
        info: the bank's encoder info.
        device: where the encoder runs.
        weights: the weights file of an encoder that is not packaged (one from ``milcore encoder train``): the file
            the bank was extracted with.

    Raises:
        UserError: ``weights`` was given and is unreadable, or is not the file the bank was extracted with (a map
            of another encoder would explain features the model never saw).
    """
    import re

    from feature_cache.encoders import create_encoder, list_encoders
    from feature_cache.encoders.registry import encoder_spec

    if info.name not in list_encoders():
        return None, f"encoder {info.name!r} is not registered here"
    base: dict[str, Any] = {} if weights is None else {"weights": str(weights)}
    attempts: list[dict[str, Any]] = [base]
    size = re.search(r"resize_shorter=(\d+)", info.transform or "")
    if size and "image_size" in encoder_spec(info.name).options:
        attempts.insert(0, {**base, "image_size": int(size.group(1))})
    last, built = "", False
    for options in attempts:
        try:
            enc = create_encoder(info.name, device=device, **options)
        except (UserError, ValueError, TypeError) as exc:
            last = str(exc)
            continue
        built = True
        diff = [k for k in FINGERPRINT if str(getattr(enc.info, k)) != str(getattr(info, k))]
        if not diff:
            return enc, None
        last = "fingerprint differs in " + ", ".join(diff)
    if weights is not None and built:
        raise UserError(f"{weights}: not the weights the bank's encoder {info.name!r} was extracted with ({last})")
    if weights is not None:
        raise UserError(last if str(weights) in last else f"{weights}: {last}")
    return None, (f"the bank's encoder {info.name!r} could not be rebuilt with its weights here ({last}); for an "
                  f"encoder trained with 'milcore encoder train', pass the weights file the bank was extracted with "
                  f"(--encoder-weights FILE)")  # fmt: skip


def _models_for(run: Path, kind: str | None, folds: np.ndarray, bags: list[str], bank_info: Any,
                device: str) -> tuple[dict[str, list[Any]], list[str]]:  # fmt: skip
    """Per bag, the aggregators that predicted it; notes for bags without one."""
    import json

    from milcore.training.checkpoint import load_checkpoint

    notes: list[str] = []
    cache: dict[Path, Any] = {}

    def load(path: Path) -> Any:
        if path not in cache:
            model, card = load_checkpoint(path, device)
            recorded = card.get("encoder") or {}
            if recorded and any(str(recorded.get(k)) != str(getattr(bank_info, k)) for k in ("name", "dim")):
                raise UserError(f"{path}: trained on encoder {recorded.get('name')!r}, the bank holds "
                                f"{bank_info.name!r} features")  # fmt: skip
            cache[path] = model
        return cache[path]

    out: dict[str, list[Any]] = {}
    if kind == "predict":
        meta = json.loads((run / "predictions.json").read_text())
        paths = [Path(p) for p in meta.get("checkpoints") or []]
        missing = [str(p) for p in paths if not p.is_dir()]
        if not paths or missing:
            listed = ", ".join(missing) or "none recorded"
            return {}, [f"the checkpoints of {run / 'predictions.json'} are not all on disk ({listed})"]
        models = [load(p) for p in paths]
        return {b: models for b in bags}, notes
    for b, k in zip(bags, folds, strict=True):
        path = run / f"fold_{int(k)}"
        if int(k) < 0 or not (path / "checkpoint.json").is_file():
            notes.append(f"{b}: no checkpoint of fold {int(k)} in {run}")
            continue
        out[b] = [load(path)]
    return out, notes


def read_crop(root: Path, bag: str, cell: str) -> np.ndarray | None:
    """The crop ``root/<bag>/<cell>.<image suffix>`` as (h, w, 3) uint8, or ``None`` when absent or unreadable."""
    from feature_cache.sources.image_io import IMAGE_SUFFIXES, read_rgb

    for suffix in IMAGE_SUFFIXES:
        path = root / bag / f"{cell}{suffix}"
        if path.is_file():
            try:
                return read_rgb(path)
            except (UserError, OSError, ValueError) as exc:
                log.warning("%s: unreadable crop (%s)", path, exc)
                return None
    return None


def top_rows(attention: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` highest-attention cells, highest first (multi-head attention averaged)."""
    a = attention if attention.ndim == 1 else attention.mean(axis=1)
    return np.argsort(-a, kind="stable")[:k]


def explain_pixels(run: str | Path, bank: Any, table: Any, attention: dict[str, np.ndarray], bags: list[str],
                   crops_root: str | Path | None, config: PixelConfig | None = None,
                   encoder: Any = None) -> PixelExplanations:  # fmt: skip
    """Occlusion / Grad-CAM / integrated-gradient maps of each listed patient's top-attention cells.

    Args:
        run: the training run or prediction folder (its checkpoints are loaded).
        bank: the open bank the predictions were made from.
        table: the :class:`~milcore.data.predictions.PredictionTable`.
        attention: per bag, the cells' attention (aligned with bank rows).
        bags: the patients to explain.
        crops_root: root of ``<bag>/<cell>.png`` crops; ``None``: skipped with a note.
        config: settings (:class:`PixelConfig`).
        encoder: an already built :class:`~feature_cache.encoders.base.Encoder` (default: rebuilt from the bank).

    Returns:
        The explanations and the notes on what was skipped.
    """
    import torch

    from milcore.data.predictions import prediction_sources
    from milcore.trust import pixels as px

    config = config or PixelConfig()
    run = Path(run)
    result = PixelExplanations([], [], None, None, config)
    if crops_root is None:
        result.notes.append("no crops: pixel explanations need the cells' crops (--crops ROOT); skipped")
        return result
    if "cell_id" not in bank.columns:
        result.notes.append(f"{bank.path}: the bank stores no cell ids, so no crop can be found; skipped")
        return result
    if encoder is None:
        encoder, why = rebuild_encoder(bank.info, config.device, config.encoder_weights)
        if encoder is None:
            result.notes.append(f"{why}; pixel explanations skipped")
            return result
    result.encoder = encoder.name
    module = encoder.module.float().eval()
    layer = None
    if "gradcam" in config.methods:
        found = px.gradcam_layer(module, encoder.input_size, config.min_side)
        if found is None:
            result.notes.append(f"encoder {encoder.name!r} has no convolutional feature map: Grad-CAM skipped")
        else:
            result.layer, layer = found
    methods = [m for m in config.methods if m != "gradcam" or layer is not None]
    index = {b: i for i, b in enumerate(table.bag_ids)}
    wanted = [b for b in bags if b in index and b in attention]
    kind = prediction_sources(run)["kind"]
    models, notes = _models_for(run, kind, table.folds[[index[b] for b in wanted]], wanted, bank.info, config.device)
    result.notes += notes
    masks: dict[tuple[str, str], Any] = {}
    if (Path(crops_root) / "synth.json").is_file():
        from feature_cache.sources.synthetic_truth import cohort_masks

        masks = cohort_masks(crops_root, [b for b in wanted if b in models])
    needs_coords = any(_uses_coords(m) for ms in models.values() for m in ms) and "coords" in bank.columns
    for b in wanted:
        if b not in models:
            continue
        rows = top_rows(attention[b], config.cells_per_patient)
        x = torch.from_numpy(np.asarray(bank.read(b), dtype=np.float32))  # (N, D)
        coords = torch.from_numpy(np.asarray(bank.read_coords(b), dtype=np.float32)) if needs_coords else None
        score = px.BagScore(models[b], x.to(config.device), coords, kind=config.score)
        target = int(table.predicted[index[b]] if config.target == "predicted" else table.labels[index[b]])
        if target < 0:
            result.notes.append(f"{b}: no label, so its true class cannot be explained; patient skipped")
            continue
        ids = bank.read_column(b, "cell_id")
        for r in rows:
            cid = str(ids[r])
            crop = read_crop(Path(crops_root), b, cid)
            if crop is None:
                result.notes.append(f"{b}/{cid}: crop not found under {crops_root}; cell skipped")
                continue
            pixels = px.encode_pixels(encoder.transform, crop)  # (3, S, S) uint8
            with torch.no_grad():
                feat = module(pixels.float().unsqueeze(0).to(config.device))[0]
            cos = float(torch.nn.functional.cosine_similarity(feat, x[r].to(feat.device), dim=0))
            if cos < config.feature_tolerance:
                result.notes.append(f"{b}/{cid}: the crop re-encodes to a feature unlike the bank's row (cosine "
                                    f"{cos:.3f} < {config.feature_tolerance}): not the crop the bank was extracted "
                                    "from; cell skipped")  # fmt: skip
                continue
            cell = CellPixels(b, cid, int(r), float(attention[b][r]), target, crop)
            truth = masks.get((b, cid))
            if truth is not None and truth.mask.shape == crop.shape[:2]:
                cell.feature, cell.mask = truth.feature, truth.mask
            for m in methods:
                if m == "gradcam":
                    sal = px.gradcam(module, layer, pixels, score, int(r), target)
                elif m == "occlusion":
                    patch, stride = px.occlusion_window(config.occlusion_patch, config.occlusion_stride,
                                                        min(crop.shape[:2]), int(pixels.shape[-1]))  # fmt: skip
                    sal = np.maximum(px.occlusion(module, pixels, score, int(r), target, patch, stride), 0.0)
                else:
                    ig = (px.smoothgrad_ig(module, pixels, score, int(r), target, config.ig_steps,
                                           config.ig_noise_samples, config.ig_noise_sigma)
                          if config.ig_noise_samples else
                          px.integrated_gradients(module, pixels, score, int(r), target, config.ig_steps))  # fmt: skip
                    cell.completeness_error = ig.completeness_error
                    sal = ig.saliency()
                sal = px.to_crop_grid(sal, crop.shape[:2])
                if m == "integrated_gradients":
                    sal = px.smooth(sal, config.smooth)
                cell.maps[m] = sal
                if cell.mask is not None:
                    cell.pointing[m] = px.pointing_game(sal, cell.mask, config.tolerance, truth.cell)
            result.cells.append(cell)
    log.info("pixel explanations: %d cells of %d patients (%s)", len(result.cells), len(result.by_bag()),
             ", ".join(METHOD_LABELS[m] for m in methods))  # fmt: skip
    return result


def _uses_coords(model: Any) -> bool:
    from milcore.models import aggregator_needs

    try:
        return bool(aggregator_needs(model).coords)
    except Exception:  # a user's module declaring nothing
        return False
