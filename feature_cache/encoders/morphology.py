"""``morphology``: interpretable hand-made cell features, fast on CPU, no weights.

Each crop is resized to 96 px, split by colour deconvolution (the detector's stain vectors,
:mod:`feature_cache.sources.detect_ops`) into a nucleus mask (nucleus stain > 0.3), a cytoplasm
mask (stained, non-red-cell pixels within 1/8 of the crop of the nucleus) and glass, and
described by size, shape, colour and texture statistics. Sizes are fractions of the crop, so for
fields and slides (fixed physical crop size) they are physical sizes. :data:`FEATURE_NAMES` names
every column.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from feature_cache.encoders.base import Encoder, ResizeCrop, finish
from feature_cache.encoders.registry import register_encoder
from feature_cache.errors import InvalidArgumentError

FEATURE_NAMES = (
    "nucleus_area", "cell_area", "nc_ratio", "nucleus_offset", "nucleus_eccentricity",
    "nucleus_compactness", "nucleus_lobularity", "nucleus_radius_ratio",
    "nucleus_r", "nucleus_g", "nucleus_b", "nucleus_r_std", "nucleus_g_std", "nucleus_b_std",
    "cyto_r", "cyto_g", "cyto_b", "cyto_r_std", "cyto_g_std", "cyto_b_std",
    "nucleus_stain", "nucleus_stain_std", "cyto_eosin", "cyto_basophilia",
    "nucleus_gradient", "nucleus_laplacian", "cyto_granularity",
    "gray_mean", "gray_std", "glass_fraction", "red_cell_fraction",
)  # fmt: skip
VERSION = "1"
SIZE = 96


def _mmean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Masked mean over (H, W): x (N, ..., H, W), m (N, 1, H, W) -> (N, ...)."""
    return (x * m).sum((-2, -1)) / m.sum((-2, -1)).clamp_min(1.0)


def _mstd(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mu = _mmean(x, m)
    return (_mmean(x * x, m) - mu * mu).clamp_min(0.0).sqrt()


class Morphology(nn.Module):
    """(N, 3, S, S) uint8 -> (N, 31) float32 cell descriptors (see :data:`FEATURE_NAMES`)."""

    def __init__(self) -> None:
        super().__init__()
        from feature_cache.sources.detect_ops import _STAIN_INV

        self.register_buffer("stain_inv", torch.from_numpy(np.ascontiguousarray(_STAIN_INV)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        rgb = x.float()  # (N, 3, H, W) 0..255
        flat = rgb.flatten(2)  # (N, 3, H*W)
        bg = flat.kthvalue(max(1, int(0.95 * flat.shape[2])), dim=2).values.clamp_min(64.0)  # (N, 3) glass
        od = torch.log((bg[:, :, None, None] + 1.0) / (rgb + 1.0))  # (N, 3, H, W)
        conc = torch.einsum("nchw,cs->nshw", od, self.stain_inv)  # (N, 3, H, W) nucleus, eosin, rest
        stain, eosin = conc[:, :1], conc[:, 1:2]
        dens = od.sum(1, keepdim=True)  # (N, 1, H, W)
        nuc = (stain > 0.3).float()
        glass = ((dens < 0.1) & (stain <= 0.3)).float()
        red = ((eosin > 0.15) & (eosin > 2 * stain.clamp_min(0)) & (nuc == 0)).float()
        k = max(3, (h // 8) | 1)
        near = F.max_pool2d(nuc, (1, k), stride=1, padding=(0, k // 2))  # separable square dilation
        near = F.max_pool2d(near, (k, 1), stride=1, padding=(k // 2, 0))
        cyto = near * (1 - nuc) * (1 - glass) * (1 - red)
        cell = ((nuc + cyto) > 0).float()
        area = float(h * w)
        a_n, a_c = nuc.sum((1, 2, 3)), cell.sum((1, 2, 3))
        # shape of the nucleus mask from its moments and boundary
        yy = torch.arange(h, dtype=torch.float32, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
        xx = torch.arange(w, dtype=torch.float32, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
        cy, cx = _mmean(yy, nuc)[:, 0], _mmean(xx, nuc)[:, 0]
        dy, dx = yy - cy.view(n, 1, 1, 1), xx - cx.view(n, 1, 1, 1)
        syy, sxx, sxy = _mmean(dy * dy, nuc)[:, 0], _mmean(dx * dx, nuc)[:, 0], _mmean(dx * dy, nuc)[:, 0]
        root = ((syy - sxx) ** 2 + 4 * sxy**2).sqrt()
        l1, l2 = (syy + sxx + root) / 2, ((syy + sxx - root) / 2).clamp_min(0)
        ecc = (1 - l2 / l1.clamp_min(1e-6)).clamp(0, 1).sqrt() * (a_n > 0)
        eroded = -F.max_pool2d(-nuc, 3, stride=1, padding=1)
        perim = (nuc - eroded).sum((1, 2, 3))
        compact = (4 * math.pi * a_n / perim.clamp_min(1) ** 2).clamp(0, 1.5) * (a_n > 0)
        lobular = perim / a_n.clamp_min(1).sqrt()
        radius = (dy * dy + dx * dx).sqrt()
        rmax = (radius * nuc).flatten(1).amax(1)
        rratio = _mmean(radius, nuc)[:, 0] / rmax.clamp_min(1)
        offset = ((cy - (h - 1) / 2) ** 2 + (cx - (w - 1) / 2) ** 2).sqrt() / h * (a_n > 0)
        # colour and texture
        col = rgb / 255.0
        gray = col.mean(1, keepdim=True)  # (N, 1, H, W)
        gy = gray[:, :, 1:, :] - gray[:, :, :-1, :]
        gx = gray[:, :, :, 1:] - gray[:, :, :, :-1]
        grad = F.pad(gy.abs(), (0, 0, 0, 1)) + F.pad(gx.abs(), (0, 1, 0, 0))
        pad = F.pad(gray, (1, 1, 1, 1), mode="replicate")
        lapl = (pad[..., :-2, 1:-1] + pad[..., 2:, 1:-1] + pad[..., 1:-1, :-2] + pad[..., 1:-1, 2:] - 4 * gray).abs()
        blur = F.avg_pool2d(pad, 3, stride=1)
        feats = [
            a_n / area, a_c / area, a_n / a_c.clamp_min(1), offset, ecc, compact, lobular, rratio,
            *_mmean(col, nuc).unbind(1), *_mstd(col, nuc).unbind(1),
            *_mmean(col, cyto).unbind(1), *_mstd(col, cyto).unbind(1),
            _mmean(stain, nuc)[:, 0], _mstd(stain, nuc)[:, 0], _mmean(eosin, cyto)[:, 0], _mmean(stain, cyto)[:, 0],
            _mmean(grad, nuc)[:, 0], _mmean(lapl, nuc)[:, 0], _mmean((gray - blur).abs(), cyto)[:, 0],
            gray.mean((1, 2, 3)), gray.std((1, 2, 3)), glass.mean((1, 2, 3)), red.mean((1, 2, 3)),
        ]  # fmt: skip
        return torch.stack([f.float() for f in feats], dim=1)  # (N, 31)


@register_encoder("morphology")
def morphology(weights: str | Path | None = None, device: str | torch.device | None = None) -> Encoder:
    """Hand-made cell descriptors, 31-d, float32 everywhere (no AMP).

    Raises:
        InvalidArgumentError: weights were given (this encoder has none).
    """
    if weights is not None:
        raise InvalidArgumentError("encoder 'morphology' takes no weights")
    return finish(
        "morphology",
        Morphology(),
        ResizeCrop(SIZE, "bilinear"),
        None,
        version=VERSION,
        weights_sha256="",
        dim=len(FEATURE_NAMES),
        device=device,
        extra="features=" + ",".join(FEATURE_NAMES),
        amp=False,
    )
