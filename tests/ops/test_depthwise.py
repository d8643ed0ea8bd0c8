"""The depthwise convolution with convolution-based gradients equals torch's depthwise convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from milcore.ops.depthwise import depthwise_conv2d

SHAPES = [  # (batch, channels, height, width), kernel, padding
    ((1, 4, 6, 6), (7, 7), (3, 3)),  # TransMIL's PPEG: one bag grid, "same" padding
    ((3, 2, 9, 5), (5, 1), (2, 0)),  # RRT-MIL's EPEG form: along one axis, several maps
    ((2, 3, 4, 7), (3, 5), (0, 1)),  # uneven kernel, partial padding, output smaller than the input
    ((1, 2, 2, 2), (7, 7), (3, 3)),  # map smaller than the kernel
]


@pytest.mark.parametrize(("shape", "kernel", "padding"), SHAPES)
def test_forward_and_gradients_equal_torch_conv2d(shape, kernel, padding) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], 1, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    out = depthwise_conv2d(x, w, b, padding)
    ref = F.conv2d(x, w, b, padding=padding, groups=shape[1])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    mine = torch.autograd.grad(out, (x, w, b), g)
    theirs = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, r)
    assert torch.autograd.gradcheck(lambda x, w, b: depthwise_conv2d(x, w, b, padding), (x, w, b))


def test_channels_last_input_and_no_bias() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 5, 5, 8).permute(0, 3, 1, 2).requires_grad_(True)  # (1, 8, 5, 5), channels-last memory
    w = torch.randn(8, 1, 7, 7, requires_grad=True)
    out = depthwise_conv2d(x, w, None, (3, 3))
    ref = F.conv2d(x, w, None, padding=3, groups=8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, w))
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-3, rtol=1e-4)


def test_only_one_filter_per_channel_and_padding_within_the_kernel() -> None:
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="depthwise weight"):
        depthwise_conv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="padding"):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3), padding=(3, 0))
