"""Matplotlib figures used by the reports (Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(cm: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix") -> Any:
    """Row-normalised confusion matrix with counts."""
    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(norm, cmap="Purples", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.55 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row fraction")
    return fig


def roc_figure(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str], title: str = "ROC (one vs rest)") -> Any:
    """One-vs-rest ROC curve per class."""
    from milcore.metrics.classification import binary_auroc

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for c, name in enumerate(classes):
        pos = np.asarray(y_true) == c
        if pos.all() or not pos.any():
            continue
        order = np.argsort(-proba[:, c], kind="mergesort")
        tp = np.concatenate(([0], np.cumsum(pos[order]))) / pos.sum()
        fp = np.concatenate(([0], np.cumsum(~pos[order]))) / (~pos).sum()
        ax.plot(fp, tp, lw=1.4, label=f"{name} ({binary_auroc(pos, proba[:, c]):.2f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def reliability_figure(curve: dict[str, list[float]], title: str = "Reliability (top label)") -> Any:
    """Accuracy vs confidence per bin, with the diagonal and bin counts."""
    plt = _plt()
    conf = np.asarray(curve["confidence"])
    acc = np.asarray(curve["accuracy"])
    count = np.asarray(curve["count"])
    lower = np.asarray(curve["bin_lower"])
    width = lower[1] - lower[0] if len(lower) > 1 else 1.0
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    used = count > 0
    ax.bar(lower[used], acc[used], width=width, align="edge", color="#9e7bc4", edgecolor="white", label="accuracy")
    ax.plot(conf[used], acc[used], "o", c="#4a2a70", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    for x, a, n in zip(lower[used], acc[used], count[used], strict=True):
        ax.text(x + width / 2, min(a + 0.02, 0.97), str(int(n)), ha="center", fontsize=6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def forest_figure(
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    reference: float | None = None,
    flagged: Sequence[bool] | None = None,
    xlabel: str = "",
    title: str = "",
) -> Any:
    """Forest plot: one point with a CI per row, a reference line, flagged rows in red."""
    plt = _plt()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(6.0, 0.8 + 0.32 * n))
    y = np.arange(n)[::-1]
    flagged = list(flagged) if flagged is not None else [False] * n
    colours = ["#b00020" if f else "#4a2a70" for f in flagged]
    v = np.asarray(values, dtype=float)
    err = np.vstack([v - np.asarray(lows, dtype=float), np.asarray(highs, dtype=float) - v])
    err = np.nan_to_num(np.clip(err, 0, None))
    for yi, vi, e0, e1, c in zip(y, v, err[0], err[1], colours, strict=True):
        ax.errorbar(vi, yi, xerr=[[e0], [e1]], fmt="o", color=c, ms=4, capsize=2, lw=1.2)
    if reference is not None and np.isfinite(reference):
        ax.axvline(reference, ls=":", c="grey")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    return fig


def heatmap_figure(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str = "",
                   cmap: str = "RdPu", vmin: float = 0.0, vmax: float = 1.0, label: str = "") -> Any:  # fmt: skip
    """Annotated heatmap (e.g. subgroup x class recall, continual accuracy matrix)."""
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(cols), 1.0 + 0.4 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if (m[i, j] - vmin) / max(vmax - vmin, 1e-9) > 0.6 else "black")  # fmt: skip
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    return fig


def lines_figure(x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str = "",
                 bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Any:  # fmt: skip
    """Line plot of several series over a common x, with optional shaded bands (CIs)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", ms=3, lw=1.4, label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(x, lo, hi, alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def scatter_figure(points: dict[str, tuple[float, float]], xlabel: str, ylabel: str, title: str = "",
                   logx: bool = False) -> Any:  # fmt: skip
    """Labelled scatter (e.g. accuracy vs cost per aggregator)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    for name, (px, py) in points.items():
        ax.scatter([px], [py], s=30)
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def embedding_figure(points: np.ndarray, values: np.ndarray, title: str = "", label: str = "attention") -> Any:
    """2-D projection of cells coloured by a value (e.g. PCA of features coloured by attention)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    order = np.argsort(values)
    sc = ax.scatter(points[order, 0], points[order, 1], c=values[order], s=6, cmap="magma_r", linewidths=0)
    fig.colorbar(sc, ax=ax, label=label)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=10)
    return fig
