"""The public API: lazily exported names, and the README's "Use it from Python" code run exactly as written.

The README's code blocks are read from README.md at test time (so the two cannot drift) and executed,
in order and in one namespace, in a folder where the paths they name hold a tiny planted bank.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Use it from Python"


def readme_python_blocks() -> list[str]:
    """Every ```python block of the README's "Use it from Python" section, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"README.md's '{SECTION}' section has no python code"
    return blocks


def _planted(make_planted_bank, folder: Path, seed: int, n_bags: int) -> None:
    """A planted bank whose cohort names its label column ``aml`` (as the README's demo paths do)."""
    paths = make_planted_bank(folder, n_bags=n_bags, seed=seed)
    with open(paths["cohort"], newline="") as f:
        rows = list(csv.reader(f))
    rows[0] = ["aml" if c == "dx" else c for c in rows[0]]
    with open(paths["cohort"], "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_import_and_help_do_not_import_torch() -> None:
    code = ("import sys, milcore\nnames = dir(milcore)\nfrom milcore.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'h5py', 'scipy') if m in sys.modules]\n"
            "print('HEAVY', heavy, 'fit_fold' in names)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY [] True"


def test_exported_names_resolve() -> None:
    import milcore

    missing = [name for name in milcore.__all__ if not hasattr(milcore, name)]
    assert missing == []
    assert callable(milcore.predict) and callable(milcore.cross_validate) and callable(milcore.fit_fold)
    assert milcore.metrics.HEADLINE[0] == "balanced_accuracy"  # subpackages without an explicit import
    import milcore.prediction  # importing the module does not shadow the function

    assert callable(milcore.predict)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        milcore.nope  # noqa: B018


def test_readme_python_section_runs_as_written(planted_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    demo = tmp_path / "runs" / "demo"
    _planted(planted_factory, demo, seed=0, n_bags=30)
    (demo / "cohort").mkdir()
    for name in ("cohort.csv", "cells.csv"):
        os.replace(demo / name, demo / "cohort" / name)
    _planted(planted_factory, tmp_path / "ext", seed=1, n_bags=12)
    (demo / "external").mkdir()
    os.replace(tmp_path / "ext" / "bank.h5", demo / "external.h5")
    os.replace(tmp_path / "ext" / "cohort.csv", demo / "external" / "cohort.csv")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for block in readme_python_blocks():
        exec(compile(block, "README.md", "exec"), namespace)  # the README's own code
    cv, new, audit, mine = namespace["cv"], namespace["new"], namespace["audit"], namespace["mine"]
    assert len(cv.folds) == 5 and cv.metrics["mean"]["auroc"]["mean"] > 0.8, cv.summary()
    assert new.metrics["n"] == 12 and new.out is None
    assert audit["input"]["patients"] == 30
    assert mine.proba.shape == (len(mine.fold.test), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext", "runs"], "nothing written without out="
    assert sorted(p.name for p in demo.iterdir()) == ["bank.h5", "cohort", "external", "external.h5"]
    printed = capsys.readouterr().out
    assert "abmil on aml, 5-fold CV: balanced accuracy" in printed
