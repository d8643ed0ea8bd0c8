"""Trained encoder files: safetensors weights that say what they are, plus a JSON card.

``milcore encoder train`` writes ``encoder.safetensors`` (the backbone's state dict; its safetensors
header metadata names the architecture and its options, e.g. ``{"milcore.arch": "compact_cnn",
"milcore.options": "{\\"image_size\\": 28, \\"width\\": 32}"}``) and ``encoder.json`` beside it (the card:
recipe, data fingerprint, classes, metrics, the weights' SHA-256). ``milcore extract --encoder NAME
--weights encoder.safetensors`` reads the header: the options become the encoder's defaults (so
features are extracted at the size the encoder was trained at) and weights trained as another
architecture are refused by name, before the state dict is even compared.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from feature_cache.errors import UserError

ARCH_KEY = "milcore.arch"
OPTIONS_KEY = "milcore.options"
CARD_FORMAT = "milcore.encoder_card"


def card_path(weights: str | Path) -> Path:
    """The card beside a weights file: ``encoder.safetensors`` -> ``encoder.json``."""
    return Path(weights).with_suffix(".json")


def _atomic_bytes(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600: give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: str | Path, state: Mapping[str, Any], arch: str, options: Mapping[str, Any]) -> str:
    """Write a backbone's state dict atomically with its architecture in the header.

    Returns:
        The file's SHA-256.
    """
    from safetensors.torch import save_file

    from feature_cache.encoders.weights import sha256_file

    path = Path(path)
    tensors = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
               for k, v in state.items()}  # fmt: skip
    meta = {ARCH_KEY: arch, OPTIONS_KEY: json.dumps(dict(options), sort_keys=True)}
    _atomic_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return sha256_file(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (a temporary file renamed into place)."""
    _atomic_bytes(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_card(weights: str | Path, card: Mapping[str, Any]) -> Path:
    """Write the JSON card beside ``weights`` atomically; returns its path."""
    path = card_path(weights)
    text = json.dumps({"format": CARD_FORMAT, **card}, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_bytes(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read_card(weights: str | Path) -> dict[str, Any] | None:
    """The card beside ``weights`` (``None`` when there is none).

    Raises:
        UserError: a card that is not valid JSON.
    """
    path = card_path(weights)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable encoder card ({exc})") from None
    return card if isinstance(card, dict) and card.get("format") == CARD_FORMAT else None


def weights_header(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """``(architecture, options)`` recorded in a safetensors header, ``(None, {})`` for other files.

    Raises:
        UserError: the file is missing or not a readable safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    if path.suffix != ".safetensors":
        return None, {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise UserError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    arch = meta.get(ARCH_KEY)
    try:
        options = json.loads(meta.get(OPTIONS_KEY, "{}"))
    except ValueError:
        raise UserError(f"{path}: damaged {OPTIONS_KEY} header entry") from None
    return arch, options if isinstance(options, dict) else {}


def trained_options(path: str | Path | None, arch: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options an encoder should use with trained weights: the header's, overridden by ``given``.

    Args:
        path: the weights file (``None``: no weights, nothing recorded).
        arch: the encoder being built.
        given: options the caller set explicitly (not ``None``).

    Raises:
        UserError: the weights were trained as another architecture (naming it and the file).
    """
    chosen = {k: v for k, v in given.items() if v is not None}
    if path is None:
        return chosen
    recorded, options = weights_header(path)
    if recorded is not None and recorded != arch:
        raise UserError(f"{path}: weights file of another architecture: trained as {recorded!r}, not {arch!r} "
                        f"(use --encoder {recorded})")  # fmt: skip
    return {**options, **chosen}
