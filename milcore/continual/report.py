"""The continual run's report: metrics table, accuracy matrices and the average-accuracy curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from milcore.continual.config import ContinualConfig
from milcore.continual.scenarios import Scenario
from milcore.report.document import Report, plural
from milcore.report.glossary import CONTINUAL_TERMS, add_glossary
from milcore.report.plots import heatmap_figure, lines_figure


def _pm(entry: dict[str, Any], key: str) -> str:
    value, std = entry.get(key), entry.get(f"{key}_std")
    if value is None:
        return "n/a"
    return f"{value:.3f}" if not std else f"{value:.3f} ± {std:.3f}"


def build_report(config: ContinualConfig, scenario: Scenario, summary: dict[str, dict[str, Any]]) -> Report:
    """A :class:`Report` of every strategy's stream metrics (mean ± sd over seeds)."""
    report = Report(f"Continual MIL: {config.name}")
    seeds = ", ".join(map(str, config.seeds))
    report.paragraph(
        f"Scenario {scenario.kind}: {plural(scenario.num_tasks, 'task')} over "
        f"{plural(len(scenario.classes), 'class', 'classes')}; model {config.model}; memory budget "
        f"{plural(config.budget, 'instance')} ({config.per_bag} per stored bag); "
        f"{plural(config.train.epochs, 'epoch')} per task; seeds {seeds}."
    )
    report.table(["task", "classes", "train bags", "test bags"],
                 [[t["name"], ", ".join(t["classes"]), t["train_bags"], t["test_bags"]]
                  for t in scenario.describe()["tasks"]], caption="The stream")  # fmt: skip
    report.heading("Stream metrics")
    report.paragraph("Each accuracy is a balanced accuracy over a task's classes, predicting among every class "
                     "seen so far. Forgetting: mean drop from each task's best to its final accuracy; BWT/FWT: "
                     "backward and forward transfer (FWT is undefined when future classes are unknown).")  # fmt: skip
    rows = [[name, _pm(e, "average_accuracy"), _pm(e, "average_forgetting"), _pm(e, "backward_transfer"),
             _pm(e, "forward_transfer"), _pm(e, "final_balanced_accuracy"),
             "-" if e.get("memory_instances") is None else str(e["memory_instances"])]
            for name, e in summary.items()]  # fmt: skip
    report.table(["strategy", "average accuracy", "forgetting", "BWT", "FWT", "final balanced acc.", "memory cells"],
                 rows)  # fmt: skip
    x = list(range(1, scenario.num_tasks + 1))
    report.figure(lines_figure(x, {n: e["accuracy_curve"] for n, e in summary.items()}, "tasks trained",
                               "average accuracy (tasks seen)", "Average accuracy over the stream"),
                  "Average balanced accuracy over the tasks seen so far, after each task.", "curve")  # fmt: skip
    report.heading("Per-class balanced accuracy after the last task")
    report.table(["class", *summary], [[c, *[e["per_class_balanced_accuracy"][c] for e in summary.values()]]
                                       for c in scenario.classes])  # fmt: skip
    report.heading("Accuracy matrices")
    names = [t.name for t in scenario.tasks]
    after = [f"after {i + 1}" for i in range(scenario.num_tasks)]
    for name, e in summary.items():
        m = np.asarray([[np.nan if v is None else v for v in row] for row in e["accuracy_matrix"]], dtype=float)
        report.figure(
            heatmap_figure(m, names, after, f"{name}: R[task, after task]", label="balanced accuracy"),
            f"{name}: accuracy of each task (rows) after training each task (columns).",
            f"matrix_{name}",
        )
    add_glossary(report, CONTINUAL_TERMS)
    return report


def write_report(out: str | Path, config: ContinualConfig, scenario: Scenario,
                 summary: dict[str, dict[str, Any]]) -> tuple[Path, Path]:  # fmt: skip
    """Write ``report.html`` and ``report.md`` into ``out``."""
    return build_report(config, scenario, summary).write(out, "report")
