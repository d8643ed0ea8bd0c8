"""Reports: self-contained HTML, Markdown with figure files, every plot renders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from milcore.report import Report, fmt, fmt_ci, plots


def test_report_renders_html_and_markdown(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    rep = Report("Run <A> & B")
    rep.heading("Metrics").paragraph("Headline", css="note").bullets(["one", "two"])
    rep.table(["metric", "value"], [["auroc", 0.91234], ["n", 60], ["ece", float("nan")]], caption="cap")
    rep.figure(plots.confusion_figure(np.array([[5, 1], [2, 7]]), ["a", "b"]), "confusion")
    rep.figure(plots.roc_figure(y, p, ["x", "y", "z"]), "roc")
    rep.figure(plots.reliability_figure({"bin_lower": [0, 0.5], "confidence": [0.3, 0.8], "accuracy": [0.2, 0.9],
                                         "count": [3, 5]}))  # fmt: skip
    rep.figure(plots.forest_figure(["F", "M"], [0.8, 0.9], [0.7, 0.85], [0.9, 0.95], 0.85, [True, False]))
    rep.figure(plots.heatmap_figure(np.eye(2), ["r1", "r2"], ["c1", "c2"]))
    rep.figure(plots.lines_figure([0, 1], {"s": [0.1, 0.2]}, "x", "y", bands={"s": ([0, 0.1], [0.2, 0.3])}))
    rep.figure(plots.scatter_figure({"abmil": (10.0, 0.9)}, "ms", "acc", logx=True))
    rep.figure(plots.embedding_figure(rng.normal(size=(50, 2)), rng.random(50)))
    rep.image(np.zeros((8, 8, 3), dtype=np.uint8), "cells")
    html_path, md_path = rep.write(tmp_path)
    page = html_path.read_text()
    assert "Run &lt;A&gt; &amp; B" in page and page.count("data:image/png;base64,") == 9
    assert "src='http" not in page and "<link" not in page  # self-contained
    md = md_path.read_text()
    assert "| auroc | 0.912 |" in md and "| ece | – |" in md
    assert len(list((tmp_path / "report_files").glob("*.png"))) == 9


def test_formatting() -> None:
    assert fmt(0.12345) == "0.123" and fmt(1200) == "1,200" and fmt(math.nan) == "–"
    assert fmt_ci(0.9, [0.8, 0.95]) == "0.900 [0.800, 0.950]" and fmt_ci(0.9, [math.nan, 1]) == "0.900"
