"""The cell-level trust sections of ``milcore explain``: morphological attributes of the top cells
(:mod:`milcore.trust.concepts`) and pixel-level overlays scored by the pointing game
(:mod:`milcore.trust.pixels`, :mod:`milcore.trust.pixel_run`); and the two cell helpers both these sections
and the galleries of :mod:`milcore.explain` use (``montage``, ``rank_cells``), kept here so that ``explain``
sits above this module and no import runs the other way."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


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


def rank_cells(attention: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest- and ``k`` lowest-attention cells (highest first / lowest first)."""
    a = attention if attention.ndim == 1 else attention.mean(axis=1)
    order = np.argsort(-a, kind="stable")
    return order[:k], order[::-1][:k]


#: A training run's attribute heads and the attributes of its patients' top cells (``milcore explain --attributes``).
RUN_CONCEPTS = "concepts.json"


def run_attribute_heads(run: str | Path) -> Path | None:
    """``RUN/concepts.json`` when the run has attribute heads (written by ``milcore explain --attributes``), else
    ``None``; the training report then shows the attributes of its patients' top cells."""
    path = Path(run) / RUN_CONCEPTS
    return path if path.is_file() else None


def attribute_section(rep: Any, summary: dict[str, Any], run: Path, sources: dict[str, Any], table: Any,
                      shown: list[str], bank: Any, attention: dict[str, np.ndarray], source: str | Path,
                      top_k: int) -> None:  # fmt: skip
    """Per patient shown, the attributes its top-attention cells carry (``summary["patients"][b]["attributes"]``)
    and the heads' held-out scores (``summary["concepts"]``); a training run also gets ``RUN/concepts.json``
    (read by the model passport).

    Args:
        source: a cell table with attribute columns (heads trained on the run's bags) or a heads ``.json``.
        top_k: top-attention cells described per patient.
    """
    from milcore.report.files import write_json_atomic
    from milcore.trust.concepts import concepts_json, describe_top_cells, load_or_fit_heads

    heads = load_or_fit_heads(source, bank, [b for b in table.bag_ids if b in bank])
    ev = heads.evaluation
    rep.heading("Morphological attributes of the top cells")
    f1 = ev.get("macro_f1")
    rep.paragraph(f"Attribute heads (one logistic regression per attribute on the cell features, trained on "
                  f"{ev.get('patients_train', '?')} patients' cells from {source}) reach a held-out macro-F1 of "
                  f"{'n/a' if f1 is None else f'{f1:.3f}'} on {ev.get('patients_heldout', '?')} other patients. Named "
                  "below: the attribute values most of a patient's top cells carry and that are rarer among its other "
                  "cells. They describe what the model looked at; they are predicted, not observed.")  # fmt: skip
    rows, described = [], {}
    for b in shown:
        if b not in attention:
            continue
        top, _ = rank_cells(attention[b], top_k)
        x = np.asarray(bank.read(b), dtype=np.float32)  # (n, D)
        desc = describe_top_cells(heads, x[top], x)
        summary["patients"][b]["attributes"] = desc
        described[b] = desc
        entry = summary["patients"][b]
        rows.append([b, entry["label"], entry["predicted"], desc["summary"]])
    rep.table(["patient", "true", "predicted", f"attributes of the top-{top_k} cells"], rows)
    scored = [(a, ev[a]["macro_f1"]) for a in heads.attributes if isinstance(ev.get(a), dict) and "macro_f1" in ev[a]]
    if scored:
        rep.table(["attribute", "held-out macro-F1"], [[a, f"{v:.3f}"] for a, v in scored])
    payload = concepts_json(heads, described)
    summary["concepts"] = {"macro_f1": f1, "scores": payload["scores"], "source": str(source)}
    own = run / RUN_CONCEPTS
    if sources.get("kind") == "run" and not (own.exists() and Path(source).resolve() == own.resolve()):
        write_json_atomic(own, payload)  # not over the heads file read: its other patients would be lost


def pixel_section(rep: Any, summary: dict[str, Any], run: Path, table: Any, shown: list[str], bank: Any,
                  attention: dict[str, np.ndarray], crops_root: Path | None, config: Any,
                  out: Path | None = None) -> Any:  # fmt: skip
    """Occlusion / Grad-CAM / integrated-gradient overlays of each shown patient's top cells (``summary["pixels"]``),
    with the pointing game where the ground-truth masks exist; without crops or a rebuildable encoder: a note."""
    from milcore.trust.pixel_run import explain_pixels
    from milcore.trust.pixels import METHOD_LABELS, SCORE_LABELS, overlay

    result = explain_pixels(run, bank, table, attention, shown, crops_root, config)
    summary["pixels"] = result.to_json()
    summary["pixels"]["cells"] = {b: [c.to_json() for c in cells] for b, cells in result.by_bag().items()}
    rep.heading("Pixel explanations of the top cells")
    for note in result.notes:
        rep.paragraph(note, css="muted")
        log.warning("pixel explanations: %s", note)
    if not result.cells:
        return result
    methods = [m for m in config.methods if any(m in c.maps for c in result.cells)]
    explained = SCORE_LABELS[config.score].format(target=config.target)
    rep.paragraph("Per cell: the crop, then " + ", ".join(METHOD_LABELS[m] for m in methods) + f" of {explained}, "
                  "through encoder and aggregator (cyan cross: the maximum; green outline: the ground-truth diagnostic "
                  "feature where known).")  # fmt: skip
    pg = result.pointing_summary()
    if pg:
        rep.table(["method", "cells", "pointing-game accuracy", "chance (centre)", "chance (random point)",
                   "relevance mass in the feature", "chance (its share of the cell)"],
                  [[METHOD_LABELS[m], s["cells"], f"{s['accuracy']:.2f}", f"{s['chance_centre']:.2f}",
                    f"{s['chance_random_point']:.2f}", f"{s['mass']:.2f}", f"{s['mass_chance']:.2f}"]
                   for m, s in pg.items()])  # fmt: skip
    for b, cells in result.by_bag().items():
        tiles = []
        for c in cells:
            tiles.append(c.crop)
            tiles += [overlay(c.crop, c.maps[m], c.mask) for m in methods if m in c.maps]
        rep.image(montage(tiles, ncols=1 + len(methods), size=96),
                  f"{b}: one row per top cell (" + ", ".join(["crop", *[METHOD_LABELS[m] for m in methods]]) + ")")
    return result
