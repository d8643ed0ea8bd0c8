"""Building blocks shared by several aggregators: instance embedding, gated attention, head resizing."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GatedAttention", "autocast_input", "instance_embedding", "resize_linear"]


def autocast_input(x: Tensor) -> Tensor:
    """Cast ``x`` once to the autocast dtype when autocast is on (else return it unchanged).

    Autocast would otherwise cast the same features again in every ``Linear``/matmul that reads them.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def instance_embedding(in_dim: int, embed_dim: int, dropout: float) -> nn.Module:
    """``Linear -> ReLU -> Dropout`` instance encoder, or identity when ``embed_dim == 0``."""
    if embed_dim == 0:
        return nn.Identity()
    layers: list[nn.Module] = [nn.Linear(in_dim, embed_dim), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class GatedAttention(nn.Module):
    """Attention scores of Ilse et al. (2018): ``w^T (tanh(V h) * sigmoid(U h))`` (or ``w^T tanh(V h)``).

    ``V`` and ``U`` are fused into one ``Linear`` (one GEMM instead of two); ``out_dim`` columns give
    several attention branches (one per class in SCEMILA's multi-attention).
    """

    def __init__(self, in_dim: int, attention_dim: int, out_dim: int, gated: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.gated = gated
        self.attention_dim = attention_dim
        self.proj = nn.Linear(in_dim, attention_dim * (2 if gated else 1))  # [V | U]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.score = nn.Linear(attention_dim, out_dim)

    def forward(self, h: Tensor) -> Tensor:
        """``(..., in_dim) -> (..., out_dim)`` unnormalised attention logits."""
        a = self.proj(h)  # (..., A or 2A)
        a = _GatedTanhSigmoid.apply(a) if self.gated else torch.tanh(a)  # (..., A)
        return self.score(self.dropout(a))  # (..., out_dim)


class _GatedTanhSigmoid(torch.autograd.Function):
    """``tanh(v) * sigmoid(u)`` for ``a = [v | u]``, fused: one sigmoid pass, one gradient buffer.

    ``tanh(v) = 2 * sigmoid(2v) - 1`` (sigmoid is several times faster than tanh on CPU), and the
    backward writes both halves of the gradient into one tensor instead of concatenating two.
    """

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:  # type: ignore[override]
        half = a.shape[-1] // 2
        scale = torch.ones(a.shape[-1], dtype=a.dtype, device=a.device)
        scale[:half] = 2.0
        sig = torch.sigmoid(a * scale)  # (..., 2A): [sigmoid(2v) | sigmoid(u)]
        t = sig[..., :half] * 2.0 - 1.0  # tanh(v)
        s = sig[..., half:]
        ctx.save_for_backward(t, s)
        return t * s

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        t, s = ctx.saved_tensors
        half = t.shape[-1]
        out = torch.empty((*t.shape[:-1], 2 * half), dtype=grad.dtype, device=grad.device)
        gs = grad * s
        torch.mul(gs, 1.0 - t * t, out=out[..., :half])  # d/dv: g * s * (1 - t^2)
        torch.mul(gs * t, 1.0 - s, out=out[..., half:])  # d/du: g * t * s * (1 - s)
        return out


@torch.no_grad()
def resize_linear(old: nn.Linear, out_features: int) -> nn.Linear:
    """A new ``Linear`` with ``out_features`` rows; the first ``min(old, new)`` rows copied from ``old``."""
    new = nn.Linear(old.in_features, out_features, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    keep = min(old.out_features, out_features)
    new.weight[:keep].copy_(old.weight[:keep])
    if old.bias is not None:
        new.bias[:keep].copy_(old.bias[:keep])
    return new
