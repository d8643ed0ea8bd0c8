"""Depthwise 2-D convolution (stride 1) whose backward pass is two ordinary convolutions.

TransMIL's PPEG (a 7x7 depthwise convolution over the instance grid) and RRT-MIL's EPEG (a ``(k, 1)``
depthwise convolution over the attention logits) spend most of their convolution time in the backward
pass on CPU, most of it in oneDNN's depthwise **weight** gradient (seen in ``torch.profiler`` on the demo
cohort's bag grids, 512 channels, one thread). Both gradients are convolutions themselves, so
:func:`depthwise_conv2d` computes them with the forward kernel:

* input gradient: the output gradient convolved with the spatially flipped kernel (padding
  ``k - 1 - p``): an ordinary depthwise convolution;
* weight gradient: ``dW[c, i, j] = sum_{b, y, x} g[b, c, y, x] * x_pad[b, c, y + i, x + j]``, i.e. for each
  sample the padded input convolved depthwise with that sample's output gradient as the kernel (a large
  kernel and a ``kh x kw`` output), summed over the batch.

It pays on CPU for large spatial maps and few samples (TransMIL's PPEG, one bag grid at a time: 5.3x on the
demo cohort's bags, forward and backward, against the earlier shared canvas;
``python benchmarks/bench_speed.py --conv-only``, table in ``benchmarks/README.md``, issue 18 speed); for
many small maps (RRT-MIL's EPEG over 64-cell regions) it is not faster than the library's backward, and
RRT-MIL computes its EPEG as a banded matrix product instead (``milcore.models.rrt``). It has not
been measured on a GPU, so the models use it on CPU only.

The result equals ``torch.nn.functional.conv2d(x, weight, bias, padding=padding, groups=C)`` and its
gradients (checked in float64 by ``torch.autograd.gradcheck`` in the tests). Only stride 1, dilation 1
and ``groups == channels`` (one filter per channel) are supported; that is all the models need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["depthwise_conv2d"]


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])  # (B, C, H', W')

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, weight.shape[-2:]
        b, c = x.shape[:2]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-1, -2), padding=(kh - 1 - ph, kw - 1 - pw), groups=c)
        if ctx.needs_input_grad[1]:
            xp = F.pad(x, (pw, pw, ph, ph))  # (B, C, H + 2 ph, W + 2 pw)
            # one sample at a time: a (C, 1, H', W') kernel keeps the convolution depthwise, which oneDNN
            # runs several times faster than the (C, B, H', W') grouped form
            grad_w = sum(F.conv2d(xp[i : i + 1], grad[i].unsqueeze(1), groups=c) for i in range(b))  # (1, C, kh, kw)
            grad_w = grad_w.view_as(weight) if b else torch.zeros_like(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None


def depthwise_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: tuple[int, int] = (0, 0)
) -> Tensor:
    """``conv2d(x, weight, bias, padding=padding, groups=C)`` for ``(B, C, H, W)`` input and ``(C, 1, kh, kw)``
    weight, stride 1, with a faster backward pass on CPU (see the module docstring).

    Args:
        x: input ``(B, C, H, W)``; channels-last memory is kept.
        weight: one ``(kh, kw)`` filter per channel, ``(C, 1, kh, kw)``.
        bias: ``(C,)`` or ``None``.
        padding: zero padding ``(ph, pw)`` on each side; ``p <= k - 1``.

    Returns:
        ``(B, C, H + 2 ph - kh + 1, W + 2 pw - kw + 1)``.
    """
    if weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise weight must be ({x.shape[1]}, 1, kh, kw), got {tuple(weight.shape)}")
    if any(p > k - 1 for p, k in zip(padding, weight.shape[-2:], strict=True)):
        raise ValueError(f"padding {padding} exceeds kernel - 1 for kernel {tuple(weight.shape[-2:])}")
    return _DepthwiseConv2d.apply(x, weight, bias, tuple(padding))
