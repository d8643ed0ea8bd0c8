"""Fixtures for the encoder tests: real cell crops and randomly initialised DINOv2-format checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def mnist_cells(bloodmnist_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """12 real BloodMNIST test cells per class: (96, 28, 28, 3) uint8 and (96,) labels."""
    data = np.load(bloodmnist_npz)
    x, y = data["test_images"], data["test_labels"][:, 0]
    idx = np.concatenate([np.nonzero(y == c)[0][:12] for c in range(8)])
    return x[idx], y[idx]


@pytest.fixture(scope="session")
def crops(mnist_cells: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """Four real crops of mixed sizes: BloodMNIST cells, one upscaled and one made non-square."""
    from PIL import Image

    x = mnist_cells[0]
    big = np.asarray(Image.fromarray(x[30]).resize((90, 90)))
    wide = np.concatenate([x[50], x[51]], axis=1)  # (28, 56, 3)
    return [x[0], x[70], big, wide]


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a random DINOv2-format checkpoint of an architecture, cached per session."""
    from feature_cache.encoders.vit import ARCHS, DinoViT

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("vit")

    def make(name: str, grid: int = 16, registers: int = 0, half: bool = False) -> Path:
        key = (name, grid, registers, half)
        if key not in cache:
            dim, depth, heads = ARCHS[name]
            torch.manual_seed(0)
            net = DinoViT(dim, depth, heads, pos_grid=grid, registers=registers)
            with torch.no_grad():  # non-trivial layer scales so every block matters
                for p in net.parameters():
                    if p.ndim == 1 and p.shape[0] == dim:
                        p.uniform_(0.5, 1.0)
            state = {k: (v.half() if half else v) for k, v in net.state_dict().items()}
            from safetensors.torch import save_file

            path = root / f"{name}-{grid}-{registers}-{int(half)}.safetensors"
            save_file(state, str(path))
            cache[key] = path
        return cache[key]

    return make
