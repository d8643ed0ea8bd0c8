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

log = logging.getLogger(__name__)

_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def find_crop(root: Path, bag_id: str, cell_id: str) -> Path | None:
    """The crop file of a cell, or None."""
    for ext in _EXTS:
        p = root / bag_id / f"{cell_id}{ext}"
        if p.exists():
            return p
    return None


def montage(images: list[np.ndarray], ncols: int = 8, size: int = 64, pad: int = 2) -> np.ndarray:
    """Tile RGB crops (resized to ``size``) into one (H, W, 3) uint8 image on a white background."""
    from PIL import Image

    n = max(len(images), 1)
    rows = (n + ncols - 1) // ncols
    cols = min(n, ncols)
    out = np.full((rows * (size + pad) + pad, cols * (size + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        tile = np.asarray(Image.fromarray(np.asarray(img, dtype=np.uint8)).convert("RGB").resize((size, size)))
        r, c = divmod(i, ncols)
        y, x = pad + r * (size + pad), pad + c * (size + pad)
        out[y : y + size, x : x + size] = tile
    return out


def _load(path: Path | None, size: int) -> np.ndarray:
    from PIL import Image

    if path is None:
        return np.full((size, size, 3), 200, dtype=np.uint8)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def rank_cells(attention: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest- and ``k`` lowest-attention cells (highest first / lowest first)."""
    a = attention if attention.ndim == 1 else attention.mean(axis=1)
    order = np.argsort(-a, kind="stable")
    return order[:k], order[::-1][:k]


def explain_run(run: str | Path, crops: str | Path | None = None, out: str | Path | None = None,
                top_k: int = 8, max_patients: int = 12, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Write galleries and the attention projection for a training run (or a prediction folder).

    Args:
        run: folder with ``predictions.csv`` and ``attention.h5`` (and ``config.yaml`` naming the bank).
        crops: root of the crop folders; by default the cohort table's folder when it holds bag folders.
        out: output folder (default ``RUN/explain``).
        top_k: cells per gallery row.
        max_patients: patients shown (all wrong predictions first, then the most confident).
        seed: sampling seed for the projection.

    Returns:
        The content of ``explain.json`` (also written, with ``explain.html`` and ``explain.md``).
    """
    out = Path(out) if out is not None else Path(run) / "explain"
    rep, summary = build_explanations(run, crops, top_k, max_patients, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps(summary, indent=2))
    html, _ = rep.write(out, "explain")
    log.info("explanations: %s", html)
    return summary


def build_explanations(run: str | Path, crops: str | Path | None = None, top_k: int = 8, max_patients: int = 12,
                       seed: int = 0) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The explanation :class:`~milcore.report.Report` and its JSON summary (see :func:`explain_run`)."""
    import yaml

    from feature_cache.bank import open_reader
    from milcore.predict import read_attention, read_predictions
    from milcore.report import Report
    from milcore.report.plots import embedding_figure

    run = Path(run)
    table = read_predictions(run)
    attention = read_attention(run)
    cfg_path = run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    bank_path = cfg.get("run", {}).get("bank")
    if bank_path is None or not Path(bank_path).exists():
        raise UserError(f"{run}: cannot find the bank of this run (config.yaml names {bank_path!r})")
    bank = open_reader(bank_path)
    if crops is None:
        cohort = cfg.get("run", {}).get("cohort")
        guess = Path(cohort).parent if cohort else None
        crops = guess if guess is not None and table.bag_ids and (guess / table.bag_ids[0]).is_dir() else None
    crops_root = Path(crops) if crops is not None else None
    has_ids = "cell_id" in bank.columns
    classes = table.classes
    correct = table.predicted == table.labels
    conf = table.proba.max(axis=1)
    order = np.lexsort((-conf, correct))  # wrong predictions first, then the most confident
    chosen = [i for i in order if table.bag_ids[i] in attention][:max_patients]
    rep = Report(f"Explanations — {run.name}")
    rep.paragraph("Per patient: the cells with the highest attention (top row) and the lowest (bottom row). "
                  "Attention is relative within a patient and sums to 1 over its cells.")  # fmt: skip
    summary: dict[str, Any] = {"run": str(run), "patients": {}, "classes": {}}
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
        if crops_root is not None and has_ids:
            imgs = [_load(find_crop(crops_root, b, str(cell_ids[j])), 64) for j in np.concatenate([top, low])]
            rep.image(montage(imgs, ncols=len(top)), f"{b}: top-{len(top)} (upper) and lowest (lower) attention")
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
        if picks and crops_root is not None and has_ids:
            rep.image(montage([_load(find_crop(crops_root, b, cid), 64) for _, b, cid in picks], ncols=top_k),
                      f"{name}: highest relative attention in correctly predicted patients")  # fmt: skip
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
    return rep, summary
