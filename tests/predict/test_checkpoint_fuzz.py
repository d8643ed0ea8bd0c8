"""Property-based tests of checkpoint loading (issue 13, fuzzed bad-input suite).

Every damaged checkpoint either loads to exactly the original model or fails with a ``UserError``
naming the file; never an internal error, a hang or a wrong answer. A card written before hashes were
recorded cannot reveal a changed value, so for those only "loads or fails cleanly" is required.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feature_cache.errors import UserError
from milcore.training.checkpoint import CARD, WEIGHTS, load_checkpoint, save_checkpoint

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
X, PTR = torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 5, 12])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A tiny ABMIL checkpoint (with input norm) and its logits on a fixed batch."""
    from milcore.models import create_aggregator
    from milcore.models.input_norm import attach_input_norm

    torch.manual_seed(0)
    model = create_aggregator("abmil", in_dim=4, num_classes=3, embed_dim=8, attention_dim=4)
    attach_input_norm(model, torch.zeros(4), torch.full((4,), 2.0))
    folder = tmp_path_factory.mktemp("ckpt") / "fold_0"
    encoder = {"name": "toy", "version": "1", "weights_sha256": "", "transform": "none", "dim": 4}
    save_checkpoint(folder, model.eval(), classes=["control", "a", "b"], encoder=encoder, temperature=1.5, task="dx")
    with torch.no_grad():
        logits = model(X, PTR).logits
    return folder, logits


def _copy(src: Path, root: Path, legacy: bool = False) -> Path:
    dst = root / "fold_0"
    shutil.copytree(src, dst)
    if legacy:
        card = json.loads((dst / CARD).read_text())
        card.pop("weights_sha256")
        card.pop("card_sha256")
        (dst / CARD).write_text(json.dumps(card, indent=2))
    return dst


def _mutate(data: bytes, kind: str, pos: int, bit: int, junk: bytes) -> bytes:
    """Apply one kind of damage at a position scaled into the file."""
    i = pos % max(len(data), 1)
    if kind == "truncate":
        return data[:i]
    if kind == "flip":
        out = bytearray(data)
        out[i] ^= 1 << bit
        return bytes(out)
    if kind == "overwrite":
        return data[:i] + junk + data[i + len(junk) :]
    if kind == "insert":
        return data[:i] + junk + data[i:]
    if kind == "append":
        return data + junk
    return junk  # "replace": random bytes


DAMAGE = st.tuples(st.sampled_from(["truncate", "flip", "overwrite", "insert", "append", "replace"]),
                   st.integers(0, 1 << 20), st.integers(0, 7), st.binary(min_size=1, max_size=64))  # fmt: skip


def _load_or_user_error(folder: Path) -> tuple[torch.nn.Module, dict] | None:
    """Load, or return None after checking the UserError names a file of the checkpoint."""
    try:
        return load_checkpoint(folder)
    except UserError as exc:
        assert str(folder) in str(exc), f"error does not name the file: {exc}"
        return None


def _same_answer(model: torch.nn.Module, card: dict, logits: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(model(X, PTR).logits, logits), "a damaged checkpoint loaded with other weights"
    assert card["classes"] == ["control", "a", "b"] and card["temperature"] == 1.5 and card["task"] == "dx"


@FUZZ
@given(damage=DAMAGE)
def test_damaged_weights_never_load_silently(pristine: tuple[Path, torch.Tensor], damage: tuple) -> None:
    src, logits = pristine
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(src, Path(tmp))
        original = (folder / WEIGHTS).read_bytes()
        damaged = _mutate(original, *damage)
        (folder / WEIGHTS).write_bytes(damaged)
        loaded = _load_or_user_error(folder)
        if loaded is not None:
            assert damaged == original, "changed weights loaded although their SHA-256 is recorded"
            _same_answer(*loaded, logits)


@FUZZ
@given(damage=DAMAGE)
def test_damaged_weights_of_a_legacy_card_fail_cleanly(pristine: tuple[Path, torch.Tensor], damage: tuple) -> None:
    src, _ = pristine
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(src, Path(tmp), legacy=True)
        (folder / WEIGHTS).write_bytes(_mutate((folder / WEIGHTS).read_bytes(), *damage))
        loaded = _load_or_user_error(folder)
        if loaded is not None:  # without a hash a changed value cannot be seen; it must still be finite
            model, _ = loaded
            assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@FUZZ
@given(damage=DAMAGE)
def test_damaged_card_bytes_never_load_silently(pristine: tuple[Path, torch.Tensor], damage: tuple) -> None:
    src, logits = pristine
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(src, Path(tmp))
        (folder / CARD).write_bytes(_mutate((folder / CARD).read_bytes(), *damage))
        loaded = _load_or_user_error(folder)
        if loaded is not None:  # only edits that leave the parsed content unchanged may load
            _same_answer(*loaded, logits)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=True)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)  # fmt: skip
KEYS = st.sampled_from(["format", "format_version", "model", "model_config", "model_config.in_dim",
                        "model_config.num_classes", "model_config.embed_dim", "model_config.attention_dim",
                        "model_config.gated", "classes", "encoder", "temperature", "input_norm", "task",
                        "weights_sha256", "card_sha256"])  # fmt: skip


def _set(card: dict, key: str, value, delete: bool) -> None:
    parts = key.split(".")
    target = card
    for p in parts[:-1]:
        if not isinstance(target.get(p), dict):
            return
        target = target[p]
    if delete:
        target.pop(parts[-1], None)
    else:
        target[parts[-1]] = value


@FUZZ
@given(key=KEYS, value=JSON, delete=st.booleans(), legacy=st.booleans())
def test_mangled_card_values_load_identically_or_fail_cleanly(pristine: tuple[Path, torch.Tensor], key: str, value,
                                                             delete: bool, legacy: bool) -> None:  # fmt: skip
    src, logits = pristine
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(src, Path(tmp), legacy=legacy)
        card = json.loads((folder / CARD).read_text())
        before = json.dumps(card, sort_keys=True)
        _set(card, key, value, delete)
        changed = json.dumps(card, sort_keys=True) != before
        (folder / CARD).write_text(json.dumps(card))
        loaded = _load_or_user_error(folder)
        if loaded is not None and not legacy:
            assert not changed or (key == "card_sha256" and delete), f"edited card loaded: {key} = {value!r}"
            _same_answer(*loaded, logits)
