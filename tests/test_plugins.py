"""Registered names reach every command, and adding an aggregator, an encoder or a strategy is one file.

Each plug-in test writes a throwaway module into a temporary folder on ``sys.path`` and names it in
``$MILCORE_PLUGINS`` (the plug-in route of :mod:`feature_cache.registry`); nothing else is edited.
The module is then listed, used and checked by the same commands and contract checks as the
built-ins. Every test leaves the registries as it found them.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from feature_cache.registry import PLUGIN_ENV
from milcore.cli import main


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``plugin(name, source)``: write module ``name`` and name it in ``$MILCORE_PLUGINS``; undone afterwards."""
    from feature_cache.encoders.registry import REGISTRY as ENCODERS
    from feature_cache.sources.registry import REGISTRY as SOURCES
    from milcore.continual.strategies.registry import REGISTRY as STRATEGIES
    from milcore.models.registry import REGISTRY as AGGREGATORS

    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    written: list[str] = []

    def write(name: str, source: str) -> str:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        monkeypatch.setenv(PLUGIN_ENV, ",".join(written))
        return name

    with AGGREGATORS.scoped(), ENCODERS.scoped(), SOURCES.scoped(), STRATEGIES.scoped():
        yield write
    for name in written:
        sys.modules.pop(name, None)


def test_extract_accepts_every_registered_source_and_names_unknown_ones(tmp_path: Path, capsys) -> None:
    """``bloodmnist`` was documented but refused: the CLI kept its own list of sources."""
    from feature_cache.bank import open_reader
    from feature_cache.sources.bloodmnist import CELL_TYPES, BloodMnistBags, make_bloodmnist_bags

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CELL_TYPES)), 4)[:, None]  # (32, 1): the MedMNIST npz layout
    images = rng.integers(0, 255, (len(labels), 28, 28, 3), dtype=np.uint8)
    npz = tmp_path / "bloodmnist.npz"
    np.savez(npz, **{f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("images", images),
                                                                                  ("labels", labels))})  # fmt: skip
    bags = make_bloodmnist_bags(npz, tmp_path / "bags", BloodMnistBags(split="test", bags=2, bag_range=(4, 6)))
    bank = tmp_path / "bank.h5"
    argv = ["-q", "extract", "--source", "bloodmnist", "--input", str(bags), "--encoder", "toy", "--out", str(bank)]
    assert main(argv) == 0, capsys.readouterr().err
    assert open_reader(bank).bag_ids() == ["bm-test-0000", "bm-test-0001"]
    code = main(["extract", "--source", "field", "--input", str(bags), "--encoder", "toy", "--out", str(bank)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown source 'field'; did you mean 'fields'? (registered: bloodmnist, crops, fields" in err
    code = main(["extract", "--source", "crops", "--input", str(bags), "--encoder", "tyo", "--out", str(bank)])
    assert code == 2 and "unknown encoder 'tyo'; did you mean 'toy'" in capsys.readouterr().err


def test_help_lists_registered_names_without_importing_torch() -> None:
    import subprocess

    code = ("import sys; from milcore.cli import build_parser; p = build_parser(); "
            "print('torch' in sys.modules, 'feature_cache.sources.registry' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # building the parser reads no registry
    code = ("import sys, contextlib, io; from milcore.cli import main; f = io.StringIO()\n"
            "with contextlib.redirect_stdout(f): main(['extract', '--help'])\n"
            "print('torch' in sys.modules); print(f.getvalue())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "False"
    assert "bloodmnist, crops, fields, slides, synthetic" in " ".join(out.split())
