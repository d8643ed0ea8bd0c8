"""The rare-witness suite: bags of 20-60 real BloodMNIST cells holding 1-3 witnesses.

``milcore bench bloodmnist-bags --witnesses 1-3`` builds two sets of bags from the official BloodMNIST
splits (:mod:`feature_cache.sources.bloodmnist`; cells of different splits never mix): *training* bags
from the train split and *test* bags from the test split. A positive bag holds an exact number of
witness cells (uniform in ``witnesses``, e.g. 1-3 immature granulocytes or erythroblasts) among
normal leukocytes, a negative bag none; bag sizes are uniform in ``bag_range``. At 1-3 witnesses in
20-60 cells the attention of an attention-MIL model can rank the witnesses well while its bag decision
lags behind: this suite measures both for every aggregator.

Both sets are extracted into one bank; the cohort's ``split`` column makes the test-split bags the
benchmark's held-out set (``ood_site="test"``), so they never enter cross-validation: every fold model
(trained and early-stopped on train-split bags) predicts them. Per aggregator the result reports the
test-split bag AUROC and the attention instance-AUROC (witness cells against the others, per bag,
averaged), each as mean over folds x seeds with a bootstrap 95% CI, their gap, and the difference to
ABMIL paired over (seed, fold).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import InvalidArgumentError
from milcore.bench.config import BenchSpec

log = logging.getLogger(__name__)

#: Per size: training (train split) and test (test split) bags, extraction encoder and input size.
RARE_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"train_bags": 160, "test_bags": 120, "encoder": "efficientnet_lite0", "image_size": 32},
    "tiny": {"train_bags": 30, "test_bags": 16, "encoder": "toy", "image_size": None},
}
BACKGROUND = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
#: The model the suite's headline compares against ("today's ABMIL").
REFERENCE = "abmil"


def check_rare_options(witness: str, witnesses: tuple[int, int], bag_range: tuple[int, int] = (20, 60),
                       encoder: str | None = None, weights: str | None = None) -> None:  # fmt: skip
    """Refuse a witness type of the background, witness counts that do not fit the smallest bag, an unknown
    encoder or a missing weights file.

    Raises:
        InvalidArgumentError: one line naming ``--witness``, ``--witnesses``, ``--encoder`` or ``--weights``.
    """
    from feature_cache.encoders import list_encoders
    from feature_cache.sources.bloodmnist import CELL_TYPES

    if encoder is not None and encoder not in list_encoders():
        raise InvalidArgumentError(f"--encoder {encoder}: unknown encoder (choose from {', '.join(list_encoders())})")
    if weights is not None and encoder is None:
        raise InvalidArgumentError(f"--weights {weights}: give the encoder it belongs to with --encoder")
    if weights is not None and not Path(weights).is_file():
        raise InvalidArgumentError(f"--weights {weights}: no such file")
    lo, hi = witnesses
    if witness not in CELL_TYPES or witness in BACKGROUND:
        raise InvalidArgumentError(f"--witness {witness}: choose a cell type outside the background "
                                   f"({', '.join(t for t in CELL_TYPES if t not in BACKGROUND)})")  # fmt: skip
    if not 1 <= lo <= hi or hi >= bag_range[0]:
        raise InvalidArgumentError(f"--witnesses {lo}-{hi}: need 1 <= LOW <= HIGH < {bag_range[0]} (the smallest bag)")


def make_rare_witness_bags(npz: str | Path, out: str | Path, split: str, bags: int, witness: str,
                           witnesses: tuple[int, int], bag_range: tuple[int, int] = (20, 60),
                           seed: int = 0) -> Path:  # fmt: skip
    """Write ``bags`` bags of one split (half positive) in the ``bloodmnist`` source's format.

    A positive bag holds exactly ``k`` witness cells, ``k`` uniform in ``witnesses``; sizes are uniform in
    ``bag_range``. Writes ``cohort.csv`` (``patient_id, left_shift, split, n_cells, n_diagnostic``),
    ``cells.csv`` (``is_diagnostic`` per cell) and ``bags.json``; returns ``out``.

    Raises:
        InvalidArgumentError: an unknown or background witness type, or counts that do not fit a bag.
    """
    from feature_cache.sources.bloodmnist import CELL_TYPES, SPLITS, load_split

    check_rare_options(witness, witnesses, bag_range)
    lo, hi = witnesses
    _, labels = load_split(npz, split)
    rng = np.random.default_rng([seed, SPLITS.index(split), 18])
    pool = np.flatnonzero(labels == CELL_TYPES.index(witness))
    background = np.flatnonzero(np.isin(labels, [CELL_TYPES.index(t) for t in BACKGROUND]))
    sizes = rng.integers(bag_range[0], bag_range[1] + 1, size=bags)
    positive = np.zeros(bags, dtype=bool)
    positive[rng.permutation(bags)[: bags // 2]] = True
    counts = np.where(positive, rng.integers(lo, hi + 1, size=bags), 0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    members: dict[str, list[int]] = {}
    diagnostic: dict[str, list[bool]] = {}
    for i in range(bags):
        n, k = int(sizes[i]), int(counts[i])
        chosen = np.concatenate([rng.choice(pool, k, replace=False), rng.choice(background, n - k, replace=False)])
        order = rng.permutation(n)
        bag = f"rw-{split}-{i:04d}"
        members[bag] = [int(v) for v in chosen[order]]
        diagnostic[bag] = [bool(v) for v in (np.arange(n) < k)[order]]
    with open(out / "cohort.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "left_shift", "split", "n_cells", "n_diagnostic"])
        for i, (bag, idx) in enumerate(members.items()):
            w.writerow([bag, "positive" if positive[i] else "control", split, len(idx), sum(diagnostic[bag])])
    with open(out / "cells.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "cell_id", "cell_type", "is_diagnostic", "source_index"])
        for bag, idx in members.items():
            for j, (src, diag) in enumerate(zip(idx, diagnostic[bag], strict=True)):
                w.writerow([bag, f"c{j:04d}", CELL_TYPES[labels[src]], int(diag), src])
    config = {"split": split, "bags": bags, "witness": witness, "witnesses": [lo, hi], "bag_range": list(bag_range),
              "background": list(BACKGROUND), "seed": seed}  # fmt: skip
    meta = {"format": "milcore-bloodmnist-bags", "npz": str(Path(npz).resolve()), "config": config, "bags": members}
    (out / "bags.json").write_text(json.dumps(meta))
    return out


def _concat_csv(parts: list[Path], out: Path) -> Path:
    """The rows of CSV files with one header, in order."""
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        for i, part in enumerate(parts):
            with open(part, newline="") as g:
                rows = list(csv.reader(g))
            w.writerows(rows if i == 0 else rows[1:])
    return out


def rare_witness_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per model (default variant): test-split bag AUROC and attention instance-AUROC with CIs, their gap,
    the paired difference to ABMIL, and the suite's two targets checked on the best model."""
    from milcore.metrics import mean_ci

    ok = [r for r in result["runs"] if r.get("status", "ok") == "ok" and r.get("variant", "default") == "default"]
    keys = list(dict.fromkeys((r["impl"], r["model"]) for r in ok))
    ref = {(r["seed"], r["fold"]): r["ood_auroc"] for r in ok if (r["impl"], r["model"]) == ("milcore", REFERENCE)}
    models: list[dict[str, Any]] = []
    for impl, model in keys:
        mine = [r for r in ok if (r["impl"], r["model"]) == (impl, model)]
        entry: dict[str, Any] = {"impl": impl, "model": model, "runs": len(mine)}
        for key, name in (("ood_auroc", "bag_auroc"), ("ood_instance_auroc", "instance_auroc")):
            values = np.asarray([r.get(key, np.nan) if r.get(key) is not None else np.nan for r in mine], dtype=float)
            finite = values[np.isfinite(values)]
            bounds = mean_ci(finite, method="bootstrap")["ci95"] if finite.size > 1 else None
            entry[name] = {"mean": float(finite.mean()) if finite.size else None, "ci95": bounds}
        bag, inst = entry["bag_auroc"]["mean"], entry["instance_auroc"]["mean"]
        entry["gap"] = None if bag is None or inst is None else inst - bag
        pairs = [(r["ood_auroc"], ref[r["seed"], r["fold"]]) for r in mine if (r["seed"], r["fold"]) in ref]
        if pairs and (impl, model) != ("milcore", REFERENCE):
            d = np.asarray([a - b for a, b in pairs], dtype=float)
            entry["vs_abmil"] = {"difference": float(d.mean()), "ci95": mean_ci(d, method="bootstrap")["ci95"],
                                 "pairs": len(pairs)}  # fmt: skip
        models.append(entry)
    scored = [m for m in models if m["bag_auroc"]["mean"] is not None]
    best = max(scored, key=lambda m: m["bag_auroc"]["mean"]) if scored else None
    targets: dict[str, Any] = {}
    if best is not None:
        targets["best_model"] = f"{'torchmil ' if best['impl'] == 'torchmil' else ''}{best['model']}"
        if best["gap"] is not None:
            targets["bag_within_0.05_of_instance"] = {"gap": best["gap"], "met": abs(best["gap"]) <= 0.05}
        if "vs_abmil" in best:
            targets["at_least_0.05_above_abmil"] = {"difference": best["vs_abmil"]["difference"],
                                                    "met": best["vs_abmil"]["difference"] >= 0.05}  # fmt: skip
    return {"models": models, "targets": targets}


def rare_witness_suite(out: str | Path, template: BenchSpec, size: str = "cpu", npz: str | Path | None = None,
                       witness: str = "immature_granulocyte", witnesses: tuple[int, int] = (1, 3),
                       bag_range: tuple[int, int] = (20, 60), seed: int = 0, device: str = "auto",
                       encoder: str | None = None, weights: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Build, extract and benchmark the rare-witness bags; outputs go to ``out``.

    ``encoder`` (and its ``weights``, e.g. one trained by ``milcore encoder train``) replaces the size's
    extraction encoder, at the encoder's own input size.

    Returns ``{"status": "skipped", "reason": ...}`` when BloodMNIST is absent (and no ``npz`` is given);
    otherwise the ``bench.json`` payload with ``rare_witness`` (:func:`rare_witness_summary`) added.
    """
    from milcore.bench.aggregators import run_benchmark
    from milcore.bench.report import write_outputs
    from milcore.bench.suites import BLOODMNIST_NPZ, bloodmnist_npz

    if size not in RARE_SIZES:
        raise InvalidArgumentError(f"unknown suite size {size!r} (choose from {', '.join(RARE_SIZES)})")
    if npz is None and not BLOODMNIST_NPZ.exists():
        reason = f"BloodMNIST not found at {BLOODMNIST_NPZ} (../shared/data is absent)"
        log.warning("rare-witness suite skipped: %s", reason)
        return {"status": "skipped", "reason": reason}
    npz = bloodmnist_npz(npz)
    cfg = RARE_SIZES[size]
    out = Path(out)
    parts = {}
    for split in ("train", "test"):
        parts[split] = make_rare_witness_bags(npz, out / f"bags_{split}", split, cfg[f"{split}_bags"], witness,
                                              witnesses, bag_range, seed)  # fmt: skip
    bank = out / "bank.h5"
    from feature_cache.extract import ExtractConfig, extract

    image_size = cfg["image_size"] if encoder is None else None
    encoder = encoder or cfg["encoder"]
    options = {"image_size": image_size} if image_size else {}
    for split in ("train", "test"):  # one bank; a rerun resumes (every stored bag's origin is checked first)
        extract(ExtractConfig(source="bloodmnist", input=str(parts[split]), encoder=encoder, out=str(bank),
                              device=device, encoder_options=options, weights=weights))  # fmt: skip
    cohort = _concat_csv([parts[s] / "cohort.csv" for s in ("train", "test")], out / "cohort.csv")
    cells = _concat_csv([parts[s] / "cells.csv" for s in ("train", "test")], out / "cells.csv")
    spec = replace(template, bank=str(bank), cohort=str(cohort), task="left_shift", ood_site="test",
                   site_column="split", cells=str(cells))  # fmt: skip
    result = run_benchmark(spec)
    result["case"] = {"suite": "rare-witness", "witness": witness, "witnesses": list(witnesses),
                      "bag_range": list(bag_range), "train_bags": cfg["train_bags"], "test_bags": cfg["test_bags"],
                      "train_split": "train", "test_split": "test", "encoder": encoder, "weights": weights,
                      "image_size": image_size, "seed": seed}  # fmt: skip
    result["rare_witness"] = rare_witness_summary(result)
    write_outputs(result, out)
    return result
