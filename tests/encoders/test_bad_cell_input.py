"""Bad input to encoder training: each a one-line error naming the file, exit code 2, nothing written."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.encoders.cellsets import one_line, train_cli, write_class_tree, write_csv


def test_csv_naming_missing_images(tmp_path: Path, capsys) -> None:
    table = write_csv(tmp_path / "d", n_per_class=4)
    (tmp_path / "d" / "img" / "a2.png").unlink()
    (tmp_path / "d" / "img" / "b3.png").unlink()
    assert train_cli(table, tmp_path / "out") == 2
    one_line(capsys, str(table), "2 missing image(s)", "a2.png")
    assert not (tmp_path / "out").exists()


def test_single_class(tmp_path: Path, capsys) -> None:
    tree = write_class_tree(tmp_path / "t", n_per_class=6, size=20, kinds=1)
    assert train_cli(tree, tmp_path / "out") == 2
    one_line(capsys, str(tree), "single class", "small_nucleus")
    assert not (tmp_path / "out").exists()


def test_corrupt_image(tmp_path: Path, capsys) -> None:
    tree = write_class_tree(tmp_path / "t", n_per_class=4, size=20)
    bad = tree / "small_nucleus" / "c001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    assert train_cli(tree, tmp_path / "out") == 2
    one_line(capsys, str(bad), "corrupt")
    assert not (tmp_path / "out").exists()


def test_sixteen_bit_image(tmp_path: Path, capsys) -> None:
    tree = write_class_tree(tmp_path / "t", n_per_class=4, size=20)
    wide = tree / "large_nucleus" / "c002.png"
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(wide)
    assert Image.open(wide).mode.startswith("I")
    assert train_cli(tree, tmp_path / "out") == 2
    one_line(capsys, str(wide), "16-bit")


def test_crops_smaller_than_the_network_input(tmp_path: Path, capsys) -> None:
    tree = write_class_tree(tmp_path / "t", n_per_class=4, size=20)
    tiny = tree / "large_nucleus" / "tiny.png"
    Image.fromarray(np.full((3, 3, 3), 200, np.uint8)).save(tiny)
    assert train_cli(tree, tmp_path / "out") == 2
    one_line(capsys, str(tiny), "smaller than the network's input")
    assert not (tmp_path / "out").exists()
    # 20 px crops, 64 px input
    assert train_cli(tree, tmp_path / "out2", "--image-size", "64", "--max-upscale", "2") == 2
    one_line(capsys, "smaller than the network's input", "64 px input")


def test_npz_of_16_bit_images(tmp_path: Path, capsys) -> None:
    npz = tmp_path / "wide.npz"
    np.savez(npz, train_images=np.zeros((4, 20, 20, 3), np.uint16), train_labels=np.array([[0], [1], [0], [1]]))
    assert train_cli(npz, tmp_path / "out") == 2
    one_line(capsys, str(npz), "uint16")


def test_csv_without_label_column_and_unknown_split(tmp_path: Path, capsys) -> None:
    table = write_csv(tmp_path / "d", n_per_class=3)
    rows = list(csv.reader(table.read_text().splitlines()))
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["path", "cls"], *rows[1:]])
    assert train_cli(table, tmp_path / "out") == 2
    one_line(capsys, str(table), "label")
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *[[*r, "tr"] for r in rows[1:]]])
    assert train_cli(table, tmp_path / "out") == 2
    one_line(capsys, str(table), "unknown split")


@pytest.mark.parametrize("flag", [["--temperature", "0.1"]])
def test_option_of_the_other_mode_is_refused(tmp_path: Path, capsys, flag: list[str]) -> None:
    tree = write_class_tree(tmp_path / "t", n_per_class=4, size=20)
    assert train_cli(tree, tmp_path / "out", *flag) == 2
    one_line(capsys, "--temperature", "ssl")


def test_weights_and_card_get_the_usual_file_mode(tmp_path) -> None:
    """Atomic writes go through mkstemp (mode 0600); the finished files must be readable like any output."""
    import os

    from feature_cache.encoders.card import write_text_atomic

    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "card.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "card.json").stat().st_mode & 0o777 == 0o644
