"""Blood-cell augmentations, batched in torch on the training device.

A cell has no orientation and sits on a nearly uniform background, so the geometry is free: every
element of the dihedral group (90-degree rotations, flips), an arbitrary rotation and a scale in one
``grid_sample``, and a small shift. Focus varies between scanners (Gaussian blur), and stain between
sites and days: the stain jitter works in the HED optical-density space of Tellez et al. 2018
(``s -> s * a + b`` per dye, ``a ~ U(1 - sigma, 1 + sigma)``, ``b ~ U(-sigma, sigma)``), which moves the
dye amounts the way a different staining batch does, rather than shifting RGB channels independently.
A plain brightness/contrast jitter is available too.

Hand-written (about 100 lines): kornia has the geometric and blur operations but no HED jitter and
is not installed; torchvision does not import beside the pinned CPU torch.

Input: (N, 3, S, S) uint8 or float in 0..255; output: float in 0..255, same shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from feature_cache.config import Config, option

if TYPE_CHECKING:  # torch is imported where used: the CLI reads AugmentConfig without loading torch
    import torch


@dataclass(frozen=True)
class AugmentConfig(Config):
    """Which augmentations, how strong.

    Attributes:
        dihedral: random 90-degree rotation and flip.
        rotate: random rotation by any angle (border pixels reflected).
        scale: range of the zoom factor (1: none).
        translate: largest shift as a fraction of the side.
        blur_p: probability of a Gaussian blur.
        blur_sigma: largest blur sigma in pixels.
        hed_sigma: stain jitter strength in HED space (0: off).
        rgb_jitter: brightness and contrast jitter (0: off).
    """

    config_key = "augmentation option"

    dihedral: bool = True
    rotate: bool = True
    scale: tuple[float, float] = option((0.9, 1.1), low=0.25, high=4.0)
    translate: float = option(0.05, low=0.0, high=0.5)
    blur_p: float = option(0.3, low=0.0, high=1.0)
    blur_sigma: float = option(1.0, low=0.0, high=5.0)
    hed_sigma: float = option(0.05, low=0.0, high=0.5)
    rgb_jitter: float = option(0.0, low=0.0, high=0.5)

    @classmethod
    def ssl(cls) -> AugmentConfig:
        """Stronger views for contrastive learning (SimCLR relies on crop and colour changes)."""
        return cls(scale=(0.8, 1.6), translate=0.15, blur_p=0.5, blur_sigma=1.5, hed_sigma=0.1, rgb_jitter=0.2)

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all."""
        return cls(dihedral=False, rotate=False, scale=(1.0, 1.0), translate=0.0, blur_p=0.0, hed_sigma=0.0)


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    import torch

    return torch.rand((n, *shape), generator=gen) * (high - low) + low


class Augment:
    """Random augmentation of a batch of crops (see the module docstring); holds no parameters.

    Args:
        config: the augmentation settings.
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3, S, S) 0..255 -> (N, 3, S, S) float 0..255; random draws from ``generator`` (CPU)."""
        from feature_cache.encoders.stain import hed_to_rgb, rgb_to_hed

        c, n = self.config, x.shape[0]
        x = x.float()
        if c.dihedral:
            x = self._dihedral(x, generator)
        x = self._affine(x, generator)
        if c.blur_p > 0 and c.blur_sigma > 0:
            x = self._blur(x, generator)
        if c.hed_sigma > 0:
            a = _uniform(n, 1 - c.hed_sigma, 1 + c.hed_sigma, generator, 3, 1, 1).to(x.device)
            b = _uniform(n, -c.hed_sigma, c.hed_sigma, generator, 3, 1, 1).to(x.device)
            hed = rgb_to_hed(x / 255.0, clamp=False)  # (N, 3, S, S)
            x = hed_to_rgb(hed * a + b) * 255.0
        if c.rgb_jitter > 0:
            gain = _uniform(n, 1 - c.rgb_jitter, 1 + c.rgb_jitter, generator, 1, 1, 1).to(x.device)
            shift = _uniform(n, -c.rgb_jitter, c.rgb_jitter, generator, 1, 1, 1).to(x.device) * 64.0
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * gain + mean + shift
        return x.clamp(0, 255)

    def _dihedral(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        import torch

        k = torch.randint(0, 4, (x.shape[0],), generator=gen)
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        out = torch.empty_like(x)
        for kk in range(4):
            for f in (False, True):
                idx = ((k == kk) & (flip == f)).nonzero().flatten().to(x.device)
                if len(idx):
                    y = torch.rot90(x[idx], kk, dims=(2, 3))
                    out[idx] = torch.flip(y, dims=(3,)) if f else y
        return out

    def _affine(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        import torch
        from torch.nn import functional as F

        c, n = self.config, x.shape[0]
        if not c.rotate and c.scale == (1.0, 1.0) and c.translate == 0:
            return x
        angle = _uniform(n, 0, 2 * math.pi, gen) if c.rotate else torch.zeros(n)
        # sample the zoom log-uniformly; a zoom z shows 1/z of the crop
        zoom = torch.exp(_uniform(n, math.log(c.scale[0]), math.log(c.scale[1]), gen))
        shift = _uniform(n, -c.translate, c.translate, gen, 2) * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _blur(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        import torch
        from torch.nn import functional as F

        c, n = self.config, x.shape[0]
        sigma = _uniform(n, 0.1, c.blur_sigma, gen) * (torch.rand(n, generator=gen) < c.blur_p)
        radius = max(1, math.ceil(2 * c.blur_sigma))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)  # (k,)
        kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # (N, k)
        kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.device, x.dtype)
        k = kernel.repeat_interleave(3, 0)  # (3N, k): one kernel per image and channel
        h, w = x.shape[2:]
        y = x.reshape(1, n * 3, h, w)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * 3)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * 3)
        return y.reshape(n, 3, h, w)
