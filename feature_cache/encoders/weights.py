"""Local weight files: hashing, safe loading (``.safetensors`` or ``torch.load(weights_only=True)``),
unwrapping training checkpoints and strict, clearly-reported loading into a module.

Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from feature_cache.errors import UserError

# wrappers that training scripts put around a state dict, and key prefixes they add
_NESTED = ("state_dict", "model", "teacher", "model_state_dict", "module", "net", "backbone")
_PREFIXES = ("module.", "teacher.backbone.", "student.backbone.", "teacher.", "backbone.", "model.", "encoder.")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str | None) -> str:
    """Hash ``path`` and compare with ``expected`` (when given).

    Returns:
        The file's SHA-256.

    Raises:
        UserError: the file is missing, or the hashes differ.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    actual = sha256_file(path)
    if expected and actual != expected.lower():
        raise UserError(
            f"{path}: weights SHA-256 is {actual[:16]}..., expected {expected.lower()[:16]}... (wrong file?)"
        )
    return actual


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a ``.safetensors`` file or a torch checkpoint (``weights_only=True``).

    Nested training checkpoints (``{"model": {...}}``, ``{"teacher": {...}}``) are unwrapped and
    non-tensor entries dropped.

    Raises:
        UserError: missing file, unreadable or unsafe checkpoint, or no tensors inside.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise UserError(f"{path}: cannot load weights safely ({type(exc).__name__}: {msg})") from None
    for _ in range(3):  # unwrap {"model": {...}} and the like
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _NESTED if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: not a state dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: holds no tensors")
    return tensors


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``teacher.backbone.``, ...) when that makes keys match."""
    for _ in range(3):
        if any(k in expected for k in state):
            break
        for prefix in _PREFIXES:
            if sum(k.startswith(prefix) for k in state) >= len(state) // 2 + 1:
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                break
        else:
            break
    return state


def state_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """How ``state`` fails to fit a module whose state dict is ``expected`` ('' when it fits).

    Returns:
        ``"2 shape mismatch(es), e.g. head.weight (3, 8) vs (2, 8); 1 missing key(s), e.g. ..."``.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    return "; ".join(parts)


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    arch: str,
    ignore: str = r"$^",
) -> None:
    """Load ``state`` into ``module``; every parameter and buffer must be present with its shape.

    Args:
        module: the network.
        state: tensors read from ``path``.
        path: for messages.
        arch: architecture name, for messages.
        ignore: regex of checkpoint keys to drop silently (heads the encoder does not use).

    Raises:
        UserError: missing keys, unexpected keys or shape mismatches (the weights belong to
            another architecture).
    """
    skip = re.compile(ignore)
    state = {k: v for k, v in state.items() if not skip.match(k)}
    own = module.state_dict()
    problems = state_mismatch(own, state)
    if problems:
        raise UserError(f"{path}: weights do not fit architecture {arch}: {problems}")
    module.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
