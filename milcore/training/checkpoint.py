"""Checkpoints: weights in safetensors plus a JSON card (model config, classes, encoder fingerprint,
temperature, training config, split, versions). Nothing is ever unpickled."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from feature_cache.errors import UserError

CHECKPOINT_FORMAT = "milcore-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS = "model.safetensors"
CARD = "checkpoint.json"


def versions() -> dict[str, str]:
    """Versions that produced a result."""
    import numpy

    from milcore import __version__

    return {"milcore": __version__, "torch": str(torch.__version__), "numpy": numpy.__version__,
            "python": platform.python_version()}  # fmt: skip


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    *,
    classes: list[str],
    encoder: dict[str, Any] | None,
    temperature: float = 1.0,
    train_config: dict[str, Any] | None = None,
    split: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``checkpoint.json`` into ``folder``; returns the folder."""
    from safetensors.torch import save_file

    from milcore.models.input_norm import has_input_norm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    card = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": getattr(model, "aggregator_name", type(model).__name__),
        "model_config": dataclasses.asdict(model.config),
        "classes": list(classes),
        "encoder": encoder,
        "temperature": float(temperature),
        "input_norm": has_input_norm(model),
        "train_config": train_config or {},
        "split": split or {},
        "versions": versions(),
        **(extra or {}),
    }
    (folder / CARD).write_text(json.dumps(card, indent=2, default=str))
    return folder


def read_card(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder and its card; ``path`` may be the folder, the card or the weights file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    card_path = folder / CARD
    if not card_path.exists() or not (folder / WEIGHTS).exists():
        raise UserError(f"{path}: not a milcore checkpoint (expected {CARD} and {WEIGHTS})")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{card_path}: unreadable checkpoint card ({exc.msg})") from exc
    if card.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{card_path}: not a milcore checkpoint card")
    if int(card.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise UserError(f"{card_path}: checkpoint format {card['format_version']} is newer than this milcore "
                        f"understands ({CHECKPOINT_VERSION}); upgrade milcore")  # fmt: skip
    return folder, card


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the aggregator of a checkpoint and load its weights (safetensors only).

    Returns:
        ``(model in eval mode, card)``.

    Raises:
        UserError: not a checkpoint, unknown model, or weights that do not fit the model.
    """
    from safetensors.torch import load_file

    from milcore.models import create_aggregator
    from milcore.models.input_norm import attach_input_norm
    from milcore.models.registry import get_aggregator_entry

    folder, card = read_card(path)
    name = card["model"]
    entry = get_aggregator_entry(name)
    cfg = dict(card["model_config"])
    defaults = {f.name: f.default for f in dataclasses.fields(entry.config_class)}
    for key, value in cfg.items():  # JSON turned tuples into lists
        if isinstance(value, list) and isinstance(defaults.get(key), tuple):
            cfg[key] = tuple(value)
    in_dim, num_classes = cfg.pop("in_dim"), cfg.pop("num_classes")
    model = create_aggregator(name, in_dim=in_dim, num_classes=num_classes, **cfg)
    if card.get("input_norm"):
        attach_input_norm(model)  # placeholders, filled from the weights file
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except RuntimeError as exc:
        raise UserError(f"{folder / WEIGHTS}: weights do not fit a {name} model ({str(exc).splitlines()[0]})") from exc
    return model.to(device).eval(), card
