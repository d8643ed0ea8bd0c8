"""``milcore explain``: the cells that drove each decision, as galleries a hematologist can check.

Per patient, the top- and lowest-attention cells (an image montage when the crops are on disk,
found as ``CROPS/<bag_id>/<cell_id>.(png|jpg|tif)``); per class, the most characteristic cells (the
highest-attention cells of correctly predicted patients of that class); and a 2-D PCA projection of
cells coloured by attention.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import UserError
from milcore.explain_cells import montage, rank_cells

log = logging.getLogger(__name__)

_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def find_crop(root: Path, bag_id: str, cell_id: str) -> Path | None:
    """The crop file of a cell, or None."""
    for ext in _EXTS:
        p = root / bag_id / f"{cell_id}{ext}"
        if p.exists():
            return p
    return None


def _missing_tile(size: int) -> np.ndarray:
    """A grey tile with a dark cross: a cell whose crop was not found (never mistaken for a cell)."""
    tile = np.full((size, size, 3), 200, dtype=np.uint8)
    diag = np.arange(size)
    for d in (-1, 0, 1):
        k = np.clip(diag + d, 0, size - 1)
        tile[diag, k] = tile[diag, size - 1 - k] = (90, 90, 90)
    return tile


def _load(path: Path | None, size: int) -> np.ndarray | None:
    """The crop as an RGB array; ``None`` when absent or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        return None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        log.warning("%s: unreadable crop (%s)", path, exc)
        return None


def gallery_tiles(root: Path, cells: list[tuple[str, str]], title: str, *, explicit: bool,
                  size: int = 64) -> tuple[list[np.ndarray], list[str]] | None:  # fmt: skip
    """The crops of a gallery's cells, with a marked tile where a crop is missing.

    Args:
        root: crop root (``<root>/<bag_id>/<cell_id>.png``).
        cells: ``(bag_id, cell_id)`` of each tile.
        title: the gallery's name, for messages.
        explicit: whether the user gave ``root`` (then no crop at all is an error, not a warning).
        size: side of a missing tile.

    Returns:
        ``(tiles, missing "bag/cell" names)``, or ``None`` when no crop was found and ``root`` was a guess.

    Raises:
        UserError: ``explicit`` and no crop of the gallery was found, naming the folder and an example path.
    """
    images = [_load(find_crop(root, b, c), size) for b, c in cells]
    missing = [f"{b}/{c}" for (b, c), im in zip(cells, images, strict=True) if im is None]
    if cells and len(missing) == len(cells):
        example = root / cells[0][0] / f"{cells[0][1]}.png"
        message = (f"{root}: no crop found for any of the {len(cells)} cells of the gallery '{title}' (looked for "
                   f"e.g. {example}, also {'/'.join(_EXTS[1:])})")  # fmt: skip
        if explicit:
            raise UserError(message + "; is this the root of <bag_id>/<cell_id> crop folders of this bank?")
        log.warning("%s; the gallery is shown as a table", message)
        return None
    if missing:
        log.warning("%s: %d of %d crops MISSING in the gallery '%s' (drawn as crossed grey tiles), e.g. %s", root,
                    len(missing), len(cells), title, ", ".join(missing[:3]))  # fmt: skip
    return [im if im is not None else _missing_tile(size) for im in images], missing


def explain_run(run: str | Path, crops: str | Path | None = None, out: str | Path | None = None,
                top_k: int = 8, max_patients: int = 12, seed: int = 0, *, similar: int = 0,
                similar_crops: str | Path | None = None, attributes: str | Path | None = None,
                pixels: Any = None) -> dict[str, Any]:  # fmt: skip
    """Write galleries and the attention projection for a training run (or a prediction folder).

    Args:
        run: folder with ``predictions.csv`` and ``attention.h5`` (and ``config.yaml`` naming the bank).
        crops: root of the crop folders; by default the cohort table's folder when it holds bag folders.
        out: output folder (default ``RUN/explain``).
        top_k: cells per gallery row.
        max_patients: patients shown (all wrong predictions first, then the most confident).
        seed: sampling seed for the projection.
        similar: per patient shown, the ``similar`` most similar training patients of the run (with their
            diagnoses and characteristic cells) and the training cells closest to its top cells
            (:mod:`milcore.trust.retrieval`); 0: none.
        similar_crops: crop root of the training patients (default: the run's cohort folder when it holds them).
        attributes: a cell table with WBCAtt-style attribute columns (``cells.csv``) or attribute heads
            (``.json``): per patient shown, the attributes its top cells carry (:mod:`milcore.trust.concepts`).
        pixels: a :class:`~milcore.trust.pixels.PixelConfig`: occlusion / Grad-CAM / integrated-gradient overlays of
            the top cells, scored by the pointing game on a synthetic cohort's masks; ``None``: none.

    Returns:
        The content of ``explain.json`` (also written, with ``explain.html`` and ``explain.md``).
    """
    out = Path(out) if out is not None else Path(run) / "explain"
    rep, summary = build_explanations(run, crops, top_k, max_patients, seed, similar=similar,
                                      similar_crops=similar_crops, attributes=attributes, pixels=pixels)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps(summary, indent=2))
    html, _ = rep.write(out, "explain")
    log.info("explanations: %s", html)
    return summary


def build_explanations(run: str | Path, crops: str | Path | None = None, top_k: int = 8, max_patients: int = 12,
                       seed: int = 0, *, similar: int = 0, similar_crops: str | Path | None = None,
                       attributes: str | Path | None = None,
                       pixels: Any = None) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The explanation :class:`~milcore.report.Report` and its JSON summary (see :func:`explain_run`)."""
    from feature_cache.bank import open_reader
    from milcore.data.predictions import prediction_sources, read_attention, read_predictions
    from milcore.report import Report
    from milcore.report.plots import embedding_figure

    run = Path(run)
    table = read_predictions(run)
    attention = read_attention(run)
    sources = prediction_sources(run)
    bank_path = sources["bank"]
    if bank_path is None or not Path(bank_path).exists():
        named = {"predict": "predictions.json", "run": "config.yaml"}.get(sources["kind"] or "", "no config.yaml or "
                                                                          "predictions.json")  # fmt: skip
        raise UserError(f"{run}: cannot find the bank these predictions were made from ({named} names "
                        f"{bank_path!r})")  # fmt: skip
    bank = open_reader(bank_path)
    sizes = dict(zip(bank.bag_ids(), bank.bag_sizes().tolist(), strict=True))
    misaligned = [b for b, a in attention.items() if sizes.get(b) != len(a)]
    if misaligned:
        raise UserError(f"{run}/attention.h5: {len(misaligned)} bag(s) do not match {bank_path} (e.g. "
                        f"{misaligned[0]!r}: {len(attention[misaligned[0]])} attention values, "
                        f"{sizes.get(misaligned[0], 'no')} bank rows); was the bank replaced?")  # fmt: skip
    explicit = crops is not None
    if crops is None:
        cohort = sources["cohort"]
        guess = Path(cohort).parent if cohort else None
        crops = guess if guess is not None and table.bag_ids and (guess / table.bag_ids[0]).is_dir() else None
    elif not Path(crops).is_dir():
        raise UserError(f"--crops {crops}: no such folder")
    crops_root = Path(crops) if crops is not None else None
    has_ids = "cell_id" in bank.columns
    classes = table.classes
    correct = table.predicted == table.labels
    wrong = (table.labels >= 0) & ~correct
    conf = table.proba.max(axis=1)
    order = np.lexsort((-conf, ~wrong))  # wrong predictions first, then the most confident
    chosen = [i for i in order if table.bag_ids[i] in attention][:max_patients]
    rep = Report(f"Explanations — {run.name}")
    rep.paragraph("Per patient: the cells with the highest attention (top row) and the lowest (bottom row). "
                  "Attention is relative within a patient and sums to 1 over its cells.")  # fmt: skip
    if sources.get("partial"):
        rep.paragraph(f"PARTIAL: these predictions come from an {sources['ensemble']} (an interrupted training "
                      "run); they are not the full model.")  # fmt: skip
    summary: dict[str, Any] = {"run": str(run), "ensemble": sources.get("ensemble"),
                               "partial": bool(sources.get("partial")), "patients": {}, "classes": {},
                               "missing_crops": 0}  # fmt: skip
    for i in chosen:
        b = table.bag_ids[i]
        a = attention[b]
        top, low = rank_cells(a, top_k)
        cell_ids = bank.read_column(b, "cell_id") if has_ids else np.asarray([str(j) for j in range(len(a))])
        label = classes[table.labels[i]] if table.labels[i] >= 0 else "?"
        entry = {"label": label, "predicted": classes[table.predicted[i]], "confidence": float(conf[i]),
                 "top": [[str(cell_ids[j]), float(a[j])] for j in top],
                 "lowest": [[str(cell_ids[j]), float(a[j])] for j in low]}  # fmt: skip
        summary["patients"][b] = entry
        rep.heading(f"{b}: true {label}, predicted {entry['predicted']} ({conf[i]:.2f})", level=3)
        tiles = None
        if crops_root is not None and has_ids:
            cells = [(b, str(cell_ids[j])) for j in np.concatenate([top, low])]
            tiles = gallery_tiles(crops_root, cells, f"patient {b}", explicit=explicit)
        if tiles is not None:
            imgs, missing = tiles
            summary["missing_crops"] += len(missing)
            entry["missing_crops"] = missing
            note = f"; MISSING crops (crossed tiles): {', '.join(missing)}" if missing else ""
            rep.image(montage(imgs, ncols=len(top)),
                      f"{b}: top-{len(top)} (upper) and lowest (lower) attention{note}")  # fmt: skip
        else:
            rep.table(["rank", "top cell", "attention", "lowest cell", "attention"],
                      [[r + 1, e[0], e[1], f[0], f[1]] for r, (e, f) in enumerate(zip(entry["top"], entry["lowest"],
                                                                                      strict=False))])  # fmt: skip
    rep.heading("Most characteristic cells per class")
    for c, name in enumerate(classes):
        picks: list[tuple[float, str, str]] = []
        for i in np.flatnonzero((table.labels == c) & correct):
            b = table.bag_ids[i]
            if b not in attention:
                continue
            a = attention[b]
            top, _ = rank_cells(a, 2)
            ids = bank.read_column(b, "cell_id") if has_ids else np.asarray([str(j) for j in range(len(a))])
            picks += [(float(a[j] * len(a)), b, str(ids[j])) for j in top]
        picks.sort(reverse=True)
        picks = picks[: 2 * top_k]
        summary["classes"][name] = [[b, cid, s] for s, b, cid in picks]
        tiles = None
        if picks and crops_root is not None and has_ids:
            tiles = gallery_tiles(crops_root, [(b, cid) for _, b, cid in picks], f"class {name}", explicit=explicit)
        if tiles is not None:
            imgs, missing = tiles
            summary["missing_crops"] += len(missing)
            note = f"; MISSING crops (crossed tiles): {', '.join(missing)}" if missing else ""
            rep.image(montage(imgs, ncols=top_k),
                      f"{name}: highest relative attention in correctly predicted patients{note}")  # fmt: skip
        elif picks:
            rep.paragraph(f"{name}: " + ", ".join(f"{b}/{cid}" for _, b, cid in picks))
    rng = np.random.default_rng(seed)
    sample_ids = [b for b in table.bag_ids if b in attention]
    sample_ids = list(rng.choice(sample_ids, size=min(len(sample_ids), 40), replace=False)) if sample_ids else []
    if sample_ids:
        xs, vals = [], []
        for b in sample_ids:
            x = bank.read(b).astype(np.float32)
            a = attention[b]
            keep = rng.choice(len(x), size=min(len(x), 150), replace=False) if len(x) else np.zeros(0, int)
            xs.append(x[keep])
            vals.append(a[keep] * len(a))
        x = np.concatenate(xs)
        if len(x) >= 3:
            x = x - x.mean(axis=0)
            _, _, vt = np.linalg.svd(x, full_matrices=False)
            pts = x @ vt[:2].T
            rep.heading("Cells in feature space")
            rep.figure(embedding_figure(pts, np.log1p(np.concatenate(vals)), "PCA of cell features",
                                        "log(1 + relative attention)"),
                       "Each dot is a cell of a random sample of patients; bright = high attention.")  # fmt: skip
    summary["crops"] = str(crops_root) if crops_root is not None else None
    trust_sections(rep, summary, run, sources, table, [table.bag_ids[i] for i in chosen], bank, similar=similar,
                   similar_crops=similar_crops, cells_per_case=min(top_k, 4))  # fmt: skip
    shown = [table.bag_ids[i] for i in chosen]
    if attributes is not None:
        from milcore.explain_cells import attribute_section

        attribute_section(rep, summary, run, sources, table, shown, bank, attention, attributes, top_k)
    if pixels is not None:
        from milcore.explain_cells import pixel_section

        pixel_section(rep, summary, run, table, shown, bank, attention, crops_root, pixels)
    return rep, summary


# ----------------------------------------------------------------------------- referrals and similar cases
def trust_sections(rep: Any, summary: dict[str, Any], run: Path, sources: dict[str, Any], table: Any,
                   shown: list[str], bank: Any, *, similar: int = 0, similar_crops: str | Path | None = None,
                   cells_per_case: int = 4) -> None:  # fmt: skip
    """The patients referred for review (a ``milcore predict --abstain-above`` folder) and, with ``similar``, the
    most similar training cases of each patient shown (``summary["abstention"]``, ``summary["similar"]``)."""
    meta_path = run / "predictions.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    abstention = meta.get("abstention") if isinstance(meta, dict) else None
    if isinstance(abstention, dict) and abstention.get("sentence"):
        summary["abstention"] = abstention
        rep.heading("Referred for review")
        referred = list(abstention.get("referred_ids") or [])
        rep.paragraph(f"{abstention['sentence']}: the model abstains on these patients and a hematologist decides. "
                      + (f"Referred: {', '.join(referred[:30])}" + (" …" if len(referred) > 30 else "") + "."
                         if referred else ""))  # fmt: skip
    if similar > 0:
        _similar_section(rep, summary, run, sources, table, shown, bank, similar, similar_crops, cells_per_case)


def _run_of_predictions(run: Path, sources: dict[str, Any]) -> Path:
    """The training run whose fold models made the predictions in ``run``."""
    if sources.get("kind") == "run":
        return run
    meta = json.loads((run / "predictions.json").read_text())
    runs = [r.get("run") for r in (meta.get("ensemble") or {}).get("runs") or [] if isinstance(r, dict)]
    if len(runs) != 1 or len(meta.get("checkpoints") or []) != len(set(meta.get("checkpoints") or [])):
        raise UserError(f"{run}: similar cases need predictions made by one training run's fold ensemble "
                        f"('milcore predict --checkpoint RUN'); these come from {len(runs)} run(s)")  # fmt: skip
    return Path(runs[0])


def _similar_section(rep: Any, summary: dict[str, Any], run: Path, sources: dict[str, Any], table: Any,
                     shown: list[str], bank: Any, k: int, similar_crops: str | Path | None,
                     cells_per_case: int) -> None:  # fmt: skip
    from milcore.data.store import FeatureStore
    from milcore.trust.retrieval import index_for_run, similar_cases

    train_run = _run_of_predictions(run, sources)
    index, models = index_for_run(train_run)
    held_out = None
    if train_run == run:  # the run's own patients: only the fold model that held each out compares it
        fold_of = dict(zip(table.bag_ids, table.folds.tolist(), strict=True))
        held_out = {b: int(fold_of[b]) for b in shown}
    matches = similar_cases(index, models, FeatureStore(bank, shown), k=k, held_out=held_out,
                            cells_per_case=cells_per_case)  # fmt: skip
    explicit = similar_crops is not None
    root = Path(similar_crops) if explicit else (Path(models.cohort).parent if models.cohort else None)
    if explicit and not root.is_dir():
        raise UserError(f"--similar-crops {similar_crops}: no such folder")
    if not explicit and root is not None and not (index.patients and (root / index.patients[0]).is_dir()):
        root = None
    rep.heading("Similar training cases")
    rep.paragraph(f"For each patient, the {k} training patients of {train_run} whose bag embeddings are closest "
                  "(cosine similarity, averaged over the fold models that compared them; a patient of the run is "
                  "compared only by the fold model that held it out), with their diagnoses and most characteristic "
                  "cells (highest attention), then the training cells closest to the patient's own top cells.")
    summary["similar"] = {}
    label_of = {b: (table.classes[y] if y >= 0 else "?") for b, y in zip(table.bag_ids, table.labels, strict=True)}
    for m in matches:
        summary["similar"][m.bag_id] = m.to_dict()
        majority = m.majority()
        rep.heading(f"{m.bag_id} (true {label_of.get(m.bag_id, '?')}): majority of similar cases {majority}", level=3)
        rep.table(["rank", "training patient", "diagnosis", "similarity", "characteristic cells (rel. attention)"],
                  [[r + 1, c.bag_id, c.label, f"{c.similarity:.3f}",
                    ", ".join(f"{cid} ({a:.1f})" for cid, a in c.cells)] for r, c in enumerate(m.cases)])  # fmt: skip
        tiles = None
        if root is not None and m.cases:
            cells = [(c.bag_id, cid) for c in m.cases for cid, _ in c.cells]
            tiles = gallery_tiles(root, cells, f"similar cases of {m.bag_id}", explicit=explicit)
        if tiles is not None:
            imgs, missing = tiles
            summary["missing_crops"] = summary.get("missing_crops", 0) + len(missing)
            rep.image(montage(imgs, ncols=max(len(c.cells) for c in m.cases)),
                      f"{m.bag_id}: one row per similar training patient (rank order), its most characteristic cells"
                      + (f"; MISSING crops (crossed tiles): {', '.join(missing)}" if missing else ""))  # fmt: skip
        if m.cells:
            rep.table(["cell of this patient", "rel. attention", "closest training cells (patient/cell, diagnosis, "
                       "similarity)"],
                      [[c.cell_id, f"{c.attention:.1f}", "; ".join(f"{x['bag_id']}/{x['cell_id']} ({x['label']}, "
                                                                    f"{x['similarity']:.2f})" for x in c.matches)]
                       for c in m.cells])  # fmt: skip
