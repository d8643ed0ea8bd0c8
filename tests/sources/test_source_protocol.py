"""The source protocol and registry: Cell/CellBatch, failures, create/list/register."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from feature_cache.errors import InvalidArgumentError
from feature_cache.sources import (
    BagSource,
    Cell,
    CellBatch,
    SourceFailure,
    create_source,
    get_source_class,
    list_sources,
    register_source,
)
from feature_cache.sources import registry as reg


class TwoBags(BagSource):
    kind = "two-bags"

    def __init__(self, path: str | Path, size: int = 8) -> None:
        super().__init__()
        self.path = str(path)
        self.size = size

    def bag_ids(self) -> list[str]:
        return ["a", "b"]

    def iter_cells(self, bag_id: str) -> Iterator[Cell]:
        if bag_id not in self.bag_ids():
            raise self._unknown_bag(bag_id)
        for i in range(3):
            if bag_id == "b" and i == 1:
                self.record_failure(f"{bag_id}/{i}.png", "broken\nimage", bag_id)
                continue
            pixels = np.full((self.size, self.size + i, 3), i, dtype=np.uint8)
            yield Cell(pixels, (i, 2 * i), f"c{i}", "lymphocyte" if i else None)


@pytest.fixture
def two_bags_registered() -> Iterator[None]:
    with reg.REGISTRY.scoped():
        register_source("two-bags", TwoBags)
        yield
    assert "two-bags" not in list_sources()


def test_builtin_kinds_are_listed_without_importing_them() -> None:
    assert {"bloodmnist", "crops", "fields", "slides", "synthetic"} <= set(list_sources())
    assert list_sources("s*") == ["slides", "synthetic"]


def test_create_source_builds_registered_kind(two_bags_registered: None, tmp_path: Path) -> None:
    src = create_source("two-bags", tmp_path, size=4)
    assert isinstance(src, TwoBags) and src.size == 4
    assert "two-bags" in list_sources()
    assert get_source_class("two-bags") is TwoBags


def test_read_bag_collects_cells_and_failures(two_bags_registered: None, tmp_path: Path) -> None:
    src = create_source("two-bags", tmp_path)
    a = src.read_bag("a")
    assert len(a) == 3 and isinstance(a.pixels, list)  # crops of different widths stay a list
    assert a.coords.tolist() == [[0, 0], [1, 2], [2, 4]] and a.coords.dtype == np.int64
    assert a.cell_types == [None, "lymphocyte", "lymphocyte"] and a.failures == ()
    b = src.read_bag("b")
    assert b.cell_ids == ["c0", "c2"]
    assert b.failures == (SourceFailure("b/1.png", "broken image", "b"),)
    assert src.failures == list(b.failures)
    assert [c.cell_id for c in b] == ["c0", "c2"]
    assert b.failures[0].to_dict() == {"path": "b/1.png", "reason": "broken image", "bag_id": "b"}


def test_same_size_crops_are_stacked() -> None:
    cells = [Cell(np.zeros((5, 5, 3), np.uint8), (1, 1), f"c{i}") for i in range(4)]
    batch = CellBatch.from_cells(cells)
    assert isinstance(batch.pixels, np.ndarray) and batch.pixels.shape == (4, 5, 5, 3)
    empty = CellBatch.from_cells([])
    assert len(empty) == 0 and empty.coords.shape == (0, 2)


def test_cellbatch_rejects_misaligned_columns() -> None:
    with pytest.raises(InvalidArgumentError, match="disagree"):
        CellBatch([np.zeros((2, 2, 3), np.uint8)], np.zeros((2, 2), np.int64), ["a"], [None])


def test_unknown_kind_option_and_bag_are_clear_errors(two_bags_registered: None, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown source 'nope' \(registered: bloodmnist, crops"):
        create_source("nope", tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"unknown source 'field'; did you mean 'fields'"):
        create_source("field", tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"source 'two-bags' has no option 'colour' \(its options: size\)"):
        create_source("two-bags", tmp_path, colour="red")
    with pytest.raises(InvalidArgumentError, match="no bag 'zzz'"):
        list(create_source("two-bags", tmp_path).iter_cells("zzz"))


def test_register_rejects_duplicates_and_non_sources(two_bags_registered: None) -> None:
    register_source("two-bags", TwoBags)  # same class again: a no-op

    class Other(TwoBags):
        pass

    with pytest.raises(InvalidArgumentError, match=r"source 'two-bags' is already registered \(by .*TwoBags\)"):
        register_source("two-bags", Other)
    with pytest.raises(InvalidArgumentError, match="not a BagSource"):
        register_source("bad", dict)  # type: ignore[arg-type]

    class Half(BagSource):
        def bag_ids(self) -> list[str]:
            return []

    with pytest.raises(InvalidArgumentError, match=r"source 'half': .*Half does not implement iter_cells"):
        register_source("half", Half)
    with pytest.raises(InvalidArgumentError, match=r"source 'crops' is already registered \(by .*CropFolderSource"):
        register_source("crops", Other)  # a built-in name, even before the built-in was imported
    assert "half" not in list_sources() and get_source_class("crops").__name__ == "CropFolderSource"


def test_register_as_a_decorator(tmp_path: Path) -> None:
    with reg.REGISTRY.scoped():

        @register_source("decorated")
        class Decorated(TwoBags):
            pass

        assert isinstance(create_source("decorated", tmp_path), Decorated)
    assert "decorated" not in list_sources()


def test_failures_exist_even_without_super_init() -> None:
    class Lazy(TwoBags):
        def __init__(self) -> None:  # forgets super().__init__()
            pass

    src = Lazy()
    assert src.failures == []
    src.record_failure("x.png", "bad")
    assert len(src.failures) == 1


def test_sources_pickle(two_bags_registered: None, tmp_path: Path) -> None:
    src = create_source("two-bags", tmp_path)
    again = pickle.loads(pickle.dumps(src))
    assert again.read_bag("a").cell_ids == ["c0", "c1", "c2"]


def test_importing_sources_is_cheap() -> None:
    import subprocess
    import sys

    heavy = "('torch', 'scipy', 'PIL', 'openslide')"
    code = (f"import sys, feature_cache.sources as s; s.list_sources(); "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
