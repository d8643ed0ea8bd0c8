"""The synthetic cell vocabulary: every type renders, and the morphology a hematologist reads shows."""

from __future__ import annotations

import numpy as np
import pytest

from feature_cache.sources.synthetic_render import CellRenderer, SiteStyle
from feature_cache.sources.synthetic_vocab import CELL_TYPES, RED_CELLS, TASKS, WHITE_CELLS, list_cell_types

REQUIRED = {
    "neutrophil", "band", "eosinophil", "basophil", "lymphocyte", "monocyte", "myeloblast", "myeloblast_auer",
    "abnormal_promyelocyte", "monoblast", "lymphoblast", "atypical_lymphocyte", "discocyte", "spherocyte",
    "elliptocyte", "sickle_cell", "target_cell", "microcytic_hypochromic", "macro_ovalocyte", "schistocyte",
    "teardrop",
}  # fmt: skip


@pytest.fixture(scope="module")
def renderer() -> CellRenderer:
    return CellRenderer(96, seed=0)


def _crops(
    renderer: CellRenderer, cell_type: str, n: int = 12, subtlety: float = 0.0, neighbours: bool = True
) -> np.ndarray:
    rng = np.random.default_rng(123)
    crops = [renderer.render(cell_type, rng, subtlety, neighbours=neighbours) for _ in range(n)]
    return np.stack(crops).astype(np.float32)


def _nucleus_pixels(crops: np.ndarray) -> np.ndarray:
    """Dark violet pixels (chromatin) per crop."""
    r, g, b = crops[..., 0], crops[..., 1], crops[..., 2]
    return ((g < 120) & (b > r) & (b > 110)).sum(axis=(1, 2))


def _white_cell_pixels(crops: np.ndarray) -> np.ndarray:
    """Bluish/violet pixels (white-cell body: nucleus and cytoplasm) per crop."""
    return (crops[..., 2] > crops[..., 0] + 5).sum(axis=(1, 2))


def _auer_pixels(crops: np.ndarray) -> np.ndarray:
    r, g, b = crops[..., 0], crops[..., 1], crops[..., 2]
    return ((r > 140) & (g < 80) & (b < 120) & (r > b + 50)).sum(axis=(1, 2))


def _red_area(crops: np.ndarray) -> np.ndarray:
    """Area of the (single, neighbour-free) red cell: red pixels with the pallor filled in."""
    from scipy import ndimage

    red = (crops[..., 0] - crops[..., 1]) > 35
    return np.asarray([int(ndimage.binary_fill_holes(mask).sum()) for mask in red])


def _elongation(crops: np.ndarray) -> np.ndarray:
    """Ratio of the principal axes of the red pixels."""
    out = []
    for mask in (crops[..., 0] - crops[..., 1]) > 35:
        ys, xs = np.nonzero(mask)
        ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
        out.append(float(np.sqrt(ev[-1] / max(ev[0], 1e-6))))
    return np.asarray(out)


def test_vocabulary_covers_the_required_cells_and_every_mixture() -> None:
    assert set(CELL_TYPES) >= REQUIRED
    for task in TASKS.values():
        pool = set(list_cell_types(task.lineage))
        for mixture in task.mixtures.values():
            assert set(mixture) <= pool
        assert set(task.background) <= pool and set(task.confounders) <= pool


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_every_cell_type_renders_deterministically(renderer: CellRenderer, cell_type: str) -> None:
    a = renderer.render(cell_type, np.random.default_rng(7))
    b = renderer.render(cell_type, np.random.default_rng(7))
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert a.std() > 10, "a crop must show a cell, not a flat background"
    styled = renderer.render(cell_type, np.random.default_rng(7), style=SiteStyle(blur=0.8, gamma=1.2))
    assert not np.array_equal(a, styled)


def test_unknown_cell_type(renderer: CellRenderer) -> None:
    with pytest.raises(KeyError):
        renderer.render("megakaryocyte", np.random.default_rng(0))


def test_auer_rods_show_only_where_expected(renderer: CellRenderer) -> None:
    with_rod = _auer_pixels(_crops(renderer, "myeloblast_auer"))
    without = _auer_pixels(_crops(renderer, "myeloblast"))
    normal = _auer_pixels(_crops(renderer, "neutrophil"))
    assert np.median(with_rod) >= 8
    assert np.median(without) <= 1 and np.median(normal) <= 1


def test_white_cell_sizes_follow_the_vocabulary(renderer: CellRenderer) -> None:
    small = _white_cell_pixels(_crops(renderer, "lymphocyte")).mean()
    big = _white_cell_pixels(_crops(renderer, "monoblast")).mean()
    assert big > 2.0 * small
    assert WHITE_CELLS["monoblast"].radius[0] > WHITE_CELLS["lymphocyte"].radius[1]


def test_red_cell_shapes_differ_in_area(renderer: CellRenderer) -> None:
    def area(kind: str) -> float:
        return float(np.median(_red_area(_crops(renderer, kind, neighbours=False))))

    def elong(kind: str) -> float:
        return float(np.median(_elongation(_crops(renderer, kind, neighbours=False))))

    disc = area("discocyte")
    assert area("spherocyte") < 0.75 * disc and area("microcytic_hypochromic") < 0.75 * disc
    assert area("macro_ovalocyte") > 1.3 * disc
    assert area("sickle_cell") < 0.7 * disc and area("schistocyte") < 0.8 * disc
    assert elong("discocyte") < 1.2 < 1.6 < elong("elliptocyte") and elong("sickle_cell") > 2.0
    assert elong("teardrop") > 1.2
    assert RED_CELLS["microcytic_hypochromic"].pallor[0] > RED_CELLS["discocyte"].pallor[1]


def test_subtlety_moves_abnormal_cells_toward_their_mimic(renderer: CellRenderer) -> None:
    blast = _crops(renderer, "lymphoblast", 16).mean(axis=0)
    subtle = _crops(renderer, "lymphoblast", 16, subtlety=1.0).mean(axis=0)
    normal = _crops(renderer, "lymphocyte", 16).mean(axis=0)
    assert np.abs(subtle - normal).mean() < np.abs(blast - normal).mean()
