"""Input standardisation carried by an aggregator: per-feature shift and scale fitted on training cells.

Pretrained encoders give features on very different scales (EfficientNet-Lite's pooled ReLU6 outputs lie
in ``[0, 6]`` with most of their mass near zero), and small cohorts overfit them fast. Standardising every
feature with the training fold's mean and standard deviation is fitted once per fold, stored *in the
model* as two buffers (``input_mean``, ``input_std``, saved in the checkpoint's safetensors) and applied by a
forward pre-hook, so every caller of ``model(x, ptr, ...)`` (training, prediction, explanation, continual
learning) sees the same inputs without knowing about it. ``forward_padded`` is a plain method and is not
hooked: callers of the padded path normalise with :func:`normalize_input` first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["attach_input_norm", "has_input_norm", "normalize_input"]

_FLAG = "_milcore_input_norm"


def _pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if not args:
        return args
    return (normalize_input(module, args[0]), *args[1:])


def attach_input_norm(model: nn.Module, mean: Tensor | None = None, std: Tensor | None = None) -> nn.Module:
    """Give ``model`` standardised inputs ``(x - mean) / std`` (in place; returns the model).

    Args:
        model: an aggregator with ``config.in_dim``, or any module when ``mean`` is given (its length is ``D``).
        mean: ``(D,)`` feature means (default zeros: a placeholder that a checkpoint's weights fill).
        std: ``(D,)`` feature standard deviations (default ones); values below ``1e-6`` are raised to it.
    """
    in_dim = getattr(getattr(model, "config", None), "in_dim", None)
    if in_dim is None and mean is None:
        raise ValueError(f"{type(model).__name__} has no config.in_dim; give the input statistics")
    dim = int(in_dim) if in_dim is not None else int(torch.as_tensor(mean).numel())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    mean = torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std = torch.ones(dim) if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if mean.shape != (dim,) or std.shape != (dim,):
        raise ValueError(f"input norm statistics must have shape ({dim},), got {tuple(mean.shape)}, {tuple(std.shape)}")
    std = std.clamp_min(1e-6)
    if has_input_norm(model):
        model.input_mean.copy_(mean)
        model.input_std.copy_(std)
        return model
    model.register_buffer("input_mean", mean.to(device))
    model.register_buffer("input_std", std.to(device))
    model.register_forward_pre_hook(_pre_hook)
    setattr(model, _FLAG, True)
    return model


def has_input_norm(model: nn.Module) -> bool:
    """Whether :func:`attach_input_norm` was applied to ``model``."""
    return bool(getattr(model, _FLAG, False))


def normalize_input(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` standardised as ``model`` expects it (unchanged for a model without input norm)."""
    if not has_input_norm(model):
        return x
    mean, std = model.input_mean, model.input_std
    if x.is_floating_point() and x.dtype != torch.float32:
        return ((x.float() - mean) / std).to(x.dtype)  # (..., D)
    return (x.float() - mean) / std  # (..., D)
