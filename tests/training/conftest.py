"""A tiny planted-signal bank + cohort + ground truth for training tests (built in a second)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory, planted_factory) -> dict:
    """The planted bank, built once per session."""
    return planted_factory(tmp_path_factory.mktemp("planted"))

