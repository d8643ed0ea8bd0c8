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


def synthetic_cell(size: int, seed: int) -> np.ndarray:
    """A drawn cell crop: pale background, a pink cytoplasm disc, a purple nucleus; (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(yy, xx) / (size / 2)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (235, 225, 230)
    img[r < 0.8] = (220, 150, 170)
    shift = rng.uniform(-0.15, 0.15, 2) * size
    nucleus = np.hypot(yy - shift[0], xx - shift[1]) / (size / 2) < rng.uniform(0.25, 0.5)
    img[nucleus] = (120, 60, 150)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def crops(request: pytest.FixtureRequest) -> list[np.ndarray]:
    """Four crops of mixed sizes: real BloodMNIST cells (one upscaled, one made non-square) where
    ``../shared`` has them, else drawn cells of the same sizes -- the encoder contract needs only images."""
    from PIL import Image

    try:
        x = request.getfixturevalue("mnist_cells")[0]
        cells = [x[0], x[70], x[30], x[50], x[51]]
    except pytest.skip.Exception:  # ../shared/data is absent
        cells = [synthetic_cell(28, seed) for seed in range(5)]
    big = np.asarray(Image.fromarray(cells[2]).resize((90, 90)))
    wide = np.concatenate([cells[3], cells[4]], axis=1)  # (28, 56, 3)
    return [cells[0], cells[1], big, wide]


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
