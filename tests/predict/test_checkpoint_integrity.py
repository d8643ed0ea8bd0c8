"""Checkpoint integrity: SHA-256 of weights and card, finite weights and outputs, bad files named (issue 13)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import pytest
import torch

from feature_cache.errors import UserError
from milcore.cli import main
from milcore.training.checkpoint import CARD, WEIGHTS, card_sha256, load_checkpoint, save_checkpoint


def _header_end(path: Path) -> int:
    """Offset of the first tensor byte of a safetensors file."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _legacy(fold: Path) -> None:
    """Make a card look like one written before hashes were recorded."""
    card = json.loads((fold / CARD).read_text())
    card.pop("weights_sha256", None)
    card.pop("card_sha256", None)
    (fold / CARD).write_text(json.dumps(card, indent=2))


def _rewrite_card(fold: Path, **changes) -> None:
    """Edit a card and re-seal it (as if milcore had written it so)."""
    card = json.loads((fold / CARD).read_text())
    card.update(changes)
    card["card_sha256"] = card_sha256(card)
    (fold / CARD).write_text(json.dumps(card, indent=2))


def _reseal_weights(fold: Path) -> None:
    """Record the current weights file's SHA-256 in the card (a file milcore itself wrote)."""
    _rewrite_card(fold, weights_sha256=hashlib.sha256((fold / WEIGHTS).read_bytes()).hexdigest())


def _predict(args: list[str]) -> int:
    return main(["predict", *args, "-q"])


def test_save_records_the_sha256_of_weights_and_card(finished_run: Path) -> None:
    fold = finished_run / "fold_0"
    card = json.loads((fold / CARD).read_text())
    assert card["weights_sha256"] == hashlib.sha256((fold / WEIGHTS).read_bytes()).hexdigest()
    assert card["card_sha256"] == card_sha256(card)
    assert not list(fold.glob("*.tmp"))


def test_corrupted_tensor_bytes_with_intact_header_are_refused(
    run_copy: Path, planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13 #2: before, these weights predicted NaN and called every patient 'control' with exit 0."""
    weights = run_copy / "fold_0" / WEIGHTS
    data = bytearray(weights.read_bytes())
    start = _header_end(weights)
    data[start:] = b"\xff" * (len(data) - start)  # every float becomes NaN; the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"weights do not match the SHA-256 recorded in .*checkpoint\.json"):
        load_checkpoint(run_copy / "fold_0")
    out = tmp_path / "pred"
    assert _predict(["--checkpoint", str(run_copy), "--bank", str(planted["bank"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "SHA-256" in err
    assert not out.exists() and not list(tmp_path.glob(".pred*"))


def test_a_single_flipped_bit_is_caught(run_copy: Path) -> None:
    weights = run_copy / "fold_1" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[_header_end(weights) + 5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        load_checkpoint(run_copy / "fold_1")


def test_card_without_hashes_loads_with_a_warning(run_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    _legacy(run_copy / "fold_0")
    with caplog.at_level(logging.WARNING):
        _, card = load_checkpoint(run_copy / "fold_0")
    assert card["classes"] == ["control", "sick"]
    assert "no SHA-256" in caplog.text and "older milcore" in caplog.text


def test_edited_card_is_refused(run_copy: Path) -> None:
    path = run_copy / "fold_0" / CARD
    card = json.loads(path.read_text())
    card["classes"] = card["classes"][::-1]  # swapped class names would silently swap the diagnoses
    path.write_text(json.dumps(card))
    with pytest.raises(UserError, match=r"checkpoint\.json: the card's content does not match the SHA-256"):
        load_checkpoint(run_copy / "fold_0")


def test_non_finite_weights_are_refused_at_load(run_copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    fold = run_copy / "fold_0"
    state = load_file(str(fold / WEIGHTS))
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    save_file(state, str(fold / WEIGHTS))
    _reseal_weights(fold)  # the hash matches: only the values are wrong
    with pytest.raises(UserError, match=r"model\.safetensors: non-finite weights .* head\.bias"):
        load_checkpoint(fold)


def test_non_finite_outputs_are_refused_and_nothing_is_written(run_copy: Path, planted: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Finite weights whose logits overflow: predict must refuse, naming the checkpoint and the patients."""
    fold = run_copy / "fold_0"
    model, card = load_checkpoint(fold)
    with torch.no_grad():
        model.head.weight.fill_(3e38)
    save_checkpoint(fold, model, classes=card["classes"], encoder=card["encoder"], task="dx")
    out = tmp_path / "pred"
    assert _predict(["--checkpoint", str(fold), "--bank", str(planted["bank"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(fold) in err and "non-finite logits" in err and "p000" in err
    assert not out.exists() and not list(tmp_path.glob(".pred*"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("random", "not a readable safetensors weights file"),
        ("truncated", "not a readable safetensors weights file"),
        ("empty", "not a readable safetensors weights file"),
    ],
)
def test_unreadable_weights_name_the_file(run_copy: Path, planted: dict, tmp_path: Path, damage: str, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Issue 13 #11: random bytes gave 'internal error: SafetensorError ... header too large' without a path."""
    fold = run_copy / "fold_2"
    _legacy(fold)  # no hash: the safetensors reader itself must fail cleanly
    weights = fold / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes({"random": os.urandom(5000), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(UserError, match=message) as info:
        load_checkpoint(fold)
    assert str(weights) in str(info.value)
    assert _predict(["--checkpoint", str(fold), "--bank", str(planted["bank"]), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and str(weights) in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"checkpoint\.json: unreadable checkpoint card \(not JSON"),
        ("\xff\xfe garbage", r"checkpoint\.json: unreadable checkpoint card"),
        ("[1, 2, 3]", r"checkpoint\.json: not a milcore checkpoint card"),
        ("{}", r"checkpoint\.json: not a milcore checkpoint card"),
    ],
)
def test_unreadable_card_names_the_file(run_copy: Path, text: str, message: str) -> None:
    (run_copy / "fold_0" / CARD).write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=message):
        load_checkpoint(run_copy / "fold_0")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classes": None}, "'classes' missing"),
        ({"model_config": None}, "'model_config' missing"),
        ({"model": 3}, "'model'"),
        ({"temperature": "hot"}, "'temperature'"),
        ({"temperature": -1.0}, "'temperature'"),
        ({"classes": ["a", "b", "c"]}, "3 classes but model_config.num_classes = 2"),
        ({"format_version": "one"}, "format_version"),
        ({"model": "abmill"}, "unknown aggregator 'abmill'"),
    ],
)
def test_card_with_missing_or_wrong_keys_names_the_file(run_copy: Path, changes: dict, message: str) -> None:
    fold = run_copy / "fold_0"
    card = json.loads((fold / CARD).read_text())
    for key, value in changes.items():
        if value is None:
            card.pop(key)
        else:
            card[key] = value
    card["card_sha256"] = card_sha256(card)
    (fold / CARD).write_text(json.dumps(card))
    with pytest.raises(UserError, match=message) as info:
        load_checkpoint(fold)
    assert "checkpoint.json" in str(info.value)


@pytest.mark.parametrize("change", ["rename", "reshape", "drop", "extra", "config"])
def test_tensors_that_do_not_fit_the_model_config_name_the_file(run_copy: Path, change: str) -> None:
    from safetensors.torch import load_file, save_file

    fold = run_copy / "fold_0"
    state = load_file(str(fold / WEIGHTS))
    if change == "rename":
        state["head.weights"] = state.pop("head.weight")
    elif change == "reshape":
        state["head.weight"] = torch.zeros(3, state["head.weight"].shape[1])
    elif change == "drop":
        state.pop("attention.proj.bias")
    elif change == "extra":
        state["surprise"] = torch.zeros(2)
    save_file(state, str(fold / WEIGHTS))
    _reseal_weights(fold)
    if change == "config":  # the card describes another model than the weights hold
        card = json.loads((fold / CARD).read_text())
        _rewrite_card(fold, model_config={**card["model_config"], "attention_dim": 64})
    with pytest.raises(UserError, match="tensors do not fit the abmil model") as info:
        load_checkpoint(fold)
    assert str(fold / WEIGHTS) in str(info.value)
