"""Fixtures for the segment-op tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread per test module (module fixtures included, restored afterwards).

    The tensors here are small: on a shared 2-core machine, two threads make every small op wait at an
    OpenMP barrier for a descheduled peer (a 2 s test took 50 s under load); one thread is steadier.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
