"""The pieces of a training epoch shared by :class:`~milcore.training.trainer.Trainer` and continual learning.

- :func:`epoch_order`: the bags of one epoch (a permutation, or classes drawn equally often);
- :func:`autocast_dtype` / :func:`autocast`: mixed precision (``amp``) on any device, CPU included;
- :func:`input_dtype`: the dtype to gather a model's features in (its compute dtype where it only casts them);
- :class:`OptimizerStep`: one optimisation step (backward, fp16 loss scaling, gradient clipping, step);
- :func:`forward`: call any ``nn.Module`` with the arguments its ``forward`` accepts (``coords`` and
  ``labels`` only where declared), so a user's ``forward(x, ptr)`` trains as well as an aggregator.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn

from feature_cache.devices import native_bf16
from milcore.models.input_norm import has_input_norm
from milcore.models.registry import aggregator_needs

#: ``TrainConfig.amp`` values and the autocast dtype they select (``auto``: bfloat16 on CUDA, off elsewhere;
#: ``native``: bfloat16 wherever the device computes it natively, see :func:`feature_cache.devices.native_bf16`).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}

def epoch_order(labels: np.ndarray, num_classes: int, balanced: bool, rng: np.random.Generator) -> np.ndarray:
    """Bag order of one epoch: a permutation, or (``balanced``) bags drawn with replacement so that every
    class is drawn equally often."""
    if not balanced:
        return rng.permutation(len(labels))
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    p = 1.0 / counts[labels]
    return rng.choice(len(labels), size=len(labels), replace=True, p=p / p.sum())


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (None: full precision). ``bf16`` and ``fp16`` work on the
    CPU as well (emulated, hence slow, on a CPU without native bf16; useful to test the mixed-precision
    path without a GPU); ``native`` is bfloat16 only where :func:`native_bf16` holds."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "native":
        return torch.bfloat16 if native_bf16(device.type) else None
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` with ``dtype``, disabled when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def input_dtype(model: nn.Module, amp: torch.dtype | None) -> torch.dtype:
    """The dtype to gather ``model``'s features in: the autocast dtype ``amp`` when the model declares
    ``casts_input_first`` (its first step would cast them to it anyway) and carries no input norm (which
    standardises float32 features first); float32 otherwise. The outputs are the same either way; the batch
    is half the size and the per-step cast is gone."""
    if amp is None or has_input_norm(model) or not aggregator_needs(model).casts_input_first:
        return torch.float32
    return amp


class OptimizerStep:
    """One optimisation step: zero the gradients, backward, clip, step -- with loss scaling under fp16.

    float16 gradients underflow without scaling, so fp16 training goes through a
    ``torch.amp.GradScaler`` (bfloat16 has float32's range and needs none).

    Args:
        model: the module whose gradients are clipped.
        optimizer: its optimiser.
        grad_clip: max gradient norm (0 = off).
        dtype: the autocast dtype (``torch.float16`` turns loss scaling on).
        device: where the model runs.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 dtype: torch.dtype | None, device: torch.device) -> None:  # fmt: skip
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def __call__(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` and update the parameters."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        """The loss scaler's state (empty without one), for resumable training."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


@functools.cache
def _accepts(cls: type) -> frozenset[str]:
    """Which of ``coords`` and ``labels`` the ``forward`` of module class ``cls`` accepts."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return frozenset({"coords", "labels"})
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return frozenset(n for n in ("coords", "labels") if var_kw or n in params)


def forward(model: nn.Module, x: torch.Tensor, ptr: torch.Tensor, coords: torch.Tensor | None = None,
            labels: torch.Tensor | None = None):  # fmt: skip
    """``model(x, ptr, coords, labels=labels)``, passing ``coords`` and ``labels`` only if ``forward`` takes them."""
    accepts = _accepts(type(model))
    kwargs = {}
    if "coords" in accepts:
        kwargs["coords"] = coords
    if "labels" in accepts and labels is not None:
        kwargs["labels"] = labels
    return model(x, ptr, **kwargs)
