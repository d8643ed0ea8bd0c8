"""Tiny labelled cell sets written to disk for the encoder-training tests (drawn cells, two or three types), the
in-process ``milcore encoder train`` call their bad-input tests share, and a random trained-format weights file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def drawn_cell(kind: int, size: int, seed: int) -> np.ndarray:
    """A drawn cell whose nucleus size and colour depend on ``kind``: (size, size, 3) uint8."""
    rng = np.random.default_rng([kind, seed])
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(yy, xx) / (size / 2)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (235, 225, 230)
    img[r < 0.8] = (220, 150, 170)
    shift = rng.uniform(-0.1, 0.1, 2) * size
    radius = (0.2, 0.45, 0.3)[kind] + rng.uniform(-0.04, 0.04)
    nucleus = np.hypot(yy - shift[0], xx - shift[1]) / (size / 2) < radius
    img[nucleus] = ((120, 60, 150), (90, 40, 120), (160, 90, 60))[kind]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_class_tree(root: Path, n_per_class: int = 16, size: int = 20, kinds: int = 2) -> Path:
    """``root/<type>/<i>.png`` with ``n_per_class`` drawn cells per type."""
    names = ("small_nucleus", "large_nucleus", "brown")
    for k in range(kinds):
        (root / names[k]).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(drawn_cell(k, size, i)).save(root / names[k] / f"c{i:03d}.png")
    return root


def write_csv(root: Path, n_per_class: int = 12, size: int = 20) -> Path:
    """Crops in ``root/img`` listed in ``root/cells.csv`` (path, label)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, label in enumerate(("a", "b")):
        for i in range(n_per_class):
            name = f"img/{label}{i}.png"
            Image.fromarray(drawn_cell(k, size, i)).save(root / name)
            rows.append([name, label])
    with open(root / "cells.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *rows])
    return root / "cells.csv"


def write_patients(root: Path, n: int = 12, cells: int = 8, size: int = 20) -> Path:
    """A crops source ``root/crops/<patient>/<cell>.png`` and ``root/cohort.csv`` (sick bags hold type-1 cells)."""
    rows = []
    for p in range(n):
        sick = p % 2
        folder = root / "crops" / f"p{p:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for c in range(cells):
            kind = 1 if sick and c < 3 else 0
            Image.fromarray(drawn_cell(kind, size, 100 * p + c)).save(folder / f"c{c}.png")
        rows.append([f"p{p:02d}", "sick" if sick else "control"])
    with open(root / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient_id", "dx"], *rows])
    return root


def write_attribute_csv(root: Path, n_per_class: int = 32, size: int = 20) -> Path:
    """Crops listed in ``root/cells.csv`` (path, label, dot, shade): ``dot`` (``yes``/``no``, every other crop of
    each class) is a small dark spot the class does not depend on; ``shade`` is empty (unknown) for some crops."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, label in enumerate(("a", "b")):
        for i in range(n_per_class):
            img = drawn_cell(k, size, i)
            dot = i % 2 == 0
            if dot:
                rng = np.random.default_rng([7, k, i])
                y, x = rng.integers(size // 4, 3 * size // 4 - 3, 2)
                img[y : y + 4, x : x + 4] = (30, 20, 40)
            name = f"img/{label}{i}.png"
            Image.fromarray(img).save(root / name)
            rows.append([name, label, "yes" if dot else "no", "" if i % 5 == 0 else ("pale", "dark")[i % 3 == 0]])
    with open(root / "cells.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "dot", "shade"], *rows])
    return root / "cells.csv"


def train_cli(data: Path, out: Path, *extra: str) -> int:
    """``milcore encoder train`` in-process with a tiny recipe (16 px, width 4, one epoch on the CPU)."""
    from milcore.cli import main

    return main(["encoder", "train", "--data", str(data), "--out", str(out), "--image-size", "16", "--width", "4",
                 "--epochs", "1", "--batch-size", "8", "--device", "cpu", *extra])  # fmt: skip


def one_line(capsys, *needles: str) -> str:
    """The captured stderr is one line holding every needle; returns it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def compact_weights(path: Path, seed: int = 0) -> Path:
    """A random ``compact_cnn`` weights file (width 8, 28 px), as ``milcore encoder train`` writes it."""
    import torch

    from feature_cache.encoders.card import save_weights
    from feature_cache.encoders.compact import build

    torch.manual_seed(seed)
    net, _ = build(8)
    save_weights(path, net.state_dict(), "compact_cnn", {"image_size": 28, "width": 8})
    return path
