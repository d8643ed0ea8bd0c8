"""Encoder training with cell attributes (WBCAtt-style heads beside the class head): what is written, that the
features then carry an attribute the class does not need, resumption, and bad attribute input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from feature_cache.encoders.train_supervised import SupervisedConfig, attribute_weights, train_supervised
from tests.encoders.cellsets import one_line, train_cli, write_attribute_csv, write_class_tree

TINY = {"image_size": 16, "width": 4, "batch_size": 8, "device": "cpu", "threads": 1}


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_attribute_csv(tmp_path_factory.mktemp("attr"))


@pytest.fixture(scope="module")
def runs(table: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, attrs in (("plain", ()), ("attr", ("dot", "shade"))):
        config = SupervisedConfig(data=str(table), out=str(root / name), epochs=10, patience=0, lr=5e-3,
                                  attributes=attrs, attribute_weight=2.0, **TINY)  # fmt: skip
        out[name] = (config, train_supervised(config))
    return out


def test_attribute_heads_are_written_with_their_values_and_metrics(runs) -> None:
    from feature_cache.encoders.weights import load_state_dict_file

    config, result = runs["attr"]
    card = result.card
    assert card["attributes"] == {"dot": ["no", "yes"], "shade": ["dark", "pale"]}
    assert card["recipe"]["attributes"] == ["dot", "shade"] and card["recipe"]["attribute_weight"] == 2.0
    assert {"val_attr_dot_balanced_accuracy", "val_attr_shade_macro_f1", "val_attribute_balanced_accuracy"} <= set(
        card["metrics"])
    heads = load_state_dict_file(Path(config.out) / "attributes.safetensors")
    assert heads["dot.weight"].shape == (2, 32) and heads["shade.bias"].shape == (2,)
    plain = runs["plain"][1].card
    assert plain["attributes"] == {} and "attributes" not in plain["recipe"]  # the recipe of before: it resumes
    assert not (Path(runs["plain"][0].out) / "attributes.safetensors").exists()
    assert "val_attribute_balanced_accuracy" not in plain["metrics"]


def _features(weights: Path, table: Path) -> tuple[np.ndarray, np.ndarray]:
    from feature_cache.encoders import create_encoder
    from feature_cache.encoders.celldata import read_cells

    cells = read_cells(table, attributes=("dot",))
    enc = create_encoder("compact_cnn", weights=weights, device="cpu")
    return enc.encode(cells.images), cells.attributes["dot"]


def test_features_carry_the_attribute_the_class_does_not_need(runs, table: Path) -> None:
    """A linear probe (cross-validated) reads the dot off the features of the attribute-trained encoder better
    than off those of the same recipe trained on the class alone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = {}
    for name in ("plain", "attr"):
        x, y = _features(runs[name][1].weights, table)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        scores[name] = cross_val_score(probe, x, y, cv=4, scoring="balanced_accuracy").mean()
    assert scores["attr"] > scores["plain"] + 0.1, scores
    assert scores["attr"] >= 0.9, scores


def test_killed_attribute_run_resumes_to_the_same_heads(table: Path, tmp_path: Path, monkeypatch) -> None:
    from feature_cache.encoders import loop
    from feature_cache.encoders.weights import load_state_dict_file

    def config(out: Path) -> SupervisedConfig:
        return SupervisedConfig(data=str(table), out=str(out), epochs=3, patience=0, ema=0.5, attributes=("dot",),
                                **TINY)  # fmt: skip

    straight = train_supervised(config(tmp_path / "straight"))
    real = loop.RunFolder.save_state
    saves = {"n": 0}

    def dying(self, state):
        real(self, state)
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.RunFolder, "save_state", dying)
    with pytest.raises(KeyboardInterrupt):
        train_supervised(config(tmp_path / "killed"))
    monkeypatch.setattr(loop.RunFolder, "save_state", real)
    resumed = train_supervised(config(tmp_path / "killed"))
    assert [h["epoch"] for h in resumed.card["history"]] == [1, 2, 3]
    for name in ("attributes.safetensors", "encoder.safetensors"):
        a = load_state_dict_file(tmp_path / "straight" / name)
        b = load_state_dict_file(tmp_path / "killed" / name)
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    assert straight.weights.exists()


def test_attribute_weights_balance_what_the_loss_sees() -> None:
    codes = np.array([0, 0, 0, 1, -1, 2])
    # every crop alike: values 0, 1 and 2 seen 3, 1 and 1 times (the unknown crop not counted)
    np.testing.assert_allclose(attribute_weights(codes, 4, None), [5 / 9, 5 / 3, 5 / 3, 1.0])
    # the sampler draws the last three crops 3x as often: masses 3, 3, 3 -> equal weights
    draw = np.array([1, 1, 1, 3, 3, 3], dtype=float)
    np.testing.assert_allclose(attribute_weights(codes, 3, draw), [1.0, 1.0, 1.0])




def test_cli_trains_attributes(table: Path, tmp_path: Path) -> None:
    assert train_cli(table, tmp_path / "out", "--attributes", "dot,shade", "--attribute-weight", "0.5", "-q") == 0
    card = json.loads((tmp_path / "out" / "encoder.json").read_text())
    assert list(card["attributes"]) == ["dot", "shade"] and card["recipe"]["attribute_weight"] == 0.5


@pytest.mark.parametrize(("extra", "needles"), [
    (["--attributes", "nucleoli"], ["no attribute column nucleoli", "dot, label, path, shade"]),
    (["--attributes", "label"], ["label is not an attribute column"]),
    (["--attributes", "dot,dot"], ["dot named more than once"]),
    (["--attributes", "dot", "--mode", "ssl"], ["--attributes", "--mode supervised"]),
])  # fmt: skip
def test_bad_attribute_options(table: Path, tmp_path: Path, capsys, extra: list[str], needles: list[str]) -> None:
    assert train_cli(table, tmp_path / "out", *extra) == 2
    one_line(capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_attribute_of_a_single_value_is_refused(tmp_path: Path, capsys) -> None:
    table = write_attribute_csv(tmp_path / "d", n_per_class=6)
    text = table.read_text().replace(",yes,", ",no,")
    table.write_text(text)
    assert train_cli(table, tmp_path / "out", "--attributes", "dot") == 2
    one_line(capsys, str(table), "attribute dot has only 'no'", "at least two values")
    assert not (tmp_path / "out").exists()


def test_attributes_need_a_csv(tmp_path: Path, capsys) -> None:
    tree = write_class_tree(tmp_path / "t", n_per_class=4, size=20)
    assert train_cli(tree, tmp_path / "out", "--attributes", "dot") == 2
    one_line(capsys, str(tree), "read from a CSV")
    assert not (tmp_path / "out").exists()


def test_validation_without_known_attribute_values_selects_on_the_class(table: Path, tmp_path: Path) -> None:
    import csv

    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):  # every 4th crop validates, with its shade unknown
        r["split"] = "val" if i % 4 == 0 else "train"
        r["path"] = str(table.parent / r["path"])
        if r["split"] == "val":
            r["shade"] = ""
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    result = train_supervised(SupervisedConfig(data=str(split), out=str(tmp_path / "o"), epochs=2, patience=0,
                                               attributes=("shade",), **TINY))  # fmt: skip
    assert result.card["metrics"]["best_epoch"] >= 1 and "val_attribute_balanced_accuracy" not in result.card["metrics"]


def test_an_id_column_is_not_an_attribute(tmp_path: Path, capsys) -> None:
    table = write_attribute_csv(tmp_path / "d", n_per_class=6)
    lines = table.read_text().splitlines()  # every crop's dot value made its own (an id column, not a category)
    rows = [line.replace(",yes,", f",yes{i},").replace(",no,", f",no{i},") for i, line in enumerate(lines[1:])]
    table.write_text("\n".join([lines[0], *rows]) + "\n")
    assert train_cli(table, tmp_path / "out", "--attributes", "dot") == 2
    one_line(capsys, str(table), "attribute dot has", "distinct values", "categorical column")
    assert not (tmp_path / "out").exists()
