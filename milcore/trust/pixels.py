"""Pixel-level explanations of a bag decision: Grad-CAM and integrated gradients through encoder and aggregator.

The score explained is the bag logit of one class (the predicted one) as a function of the pixels of
ONE cell of the bag: the cell's crop goes through the encoder's transform and module (the same ones
that wrote the bank), its feature replaces the cell's row of the bag, and the aggregator scores the
whole bag; every other row stays the bank's feature. So the maps answer "which pixels of this cell
moved the patient's diagnosis", through encoder and aggregator together (Sadafi et al. 2023 explain
single-cell MIL the same way).

- :func:`gradcam`: the class-logit gradient averaged over each channel of a convolutional feature map
  of the encoder weights that map's channels (Selvaraju et al. 2017); the map is the deepest one
  with at least ``min_side`` x ``min_side`` positions (:func:`gradcam_layer`), since at 96 px the last
  EfficientNet map is 3 x 3, too coarse to point within a cell. Needs a convolutional encoder.
- :func:`integrated_gradients`: the path integral of the gradient from a baseline crop (plain
  plasma, the crop's background colour) to the crop, by the midpoint rule over ``steps`` points
  (Sundararajan et al. 2017); the attributions sum to logit(crop) - logit(baseline) (the completeness
  error is returned). Needs only a differentiable encoder.

Maps live on the encoder's input grid and are mapped back onto the crop's pixel grid
(:func:`to_crop_grid`, the inverse of :class:`~feature_cache.encoders.base.ResizeCrop`).
:func:`pointing_game` scores a map against a ground-truth mask: a hit when the map's maximum lies
within ``tolerance`` pixels of the mask (Zhang et al. 2018 use 15 px at 224 px; 3 px at 96 px, about
1.2 µm, is our default), with two chance levels: the crop's centre and a uniformly random point of
the cell; beside it the relevance mass (share of the positive map inside the mask, Arras et al. 2022) and its
chance level (the mask's share of the cell).

:func:`occlusion` slides a patch of plain plasma over the crop and maps the drop of the explained score; the
score explained (:class:`BagScore`, ``PixelConfig.score``) is the bag logit, the cell's attention or its
contribution. :func:`erase` / :func:`shifted_region` support the erasure check of ``bench_trust_cells.py``
(does the model's score move when a cell's diagnostic feature is painted over, more than when a region of
the same shape elsewhere in the cell is?). Written by hand (captum is not a dependency; each method is a dozen
lines once the bag score is a function of one cell's pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from feature_cache.config import Config, option

METHODS = ("gradcam", "integrated_gradients", "occlusion")
#: The methods ``PixelConfig`` and ``milcore explain --pixels`` use unless told otherwise: integrated gradients of
#: the cell's attention (``score``). Chosen on the choosing cohorts of ``benchmarks/bench_trust_cells.py`` with
#: encoders that see the features (``milcore encoder train`` on 4,000+ crops, 16 epochs): 0.741 vs occlusion's
#: 0.444 on AML (chance 0.507) and 1.000 vs 0.838 on the ``auer`` task (chance 0.057), at 15-40 times less cost
#: per cell. (With a weaker encoder, trained on 2,000 crops for 8 epochs, occlusion had been ahead: 0.642 vs 0.346.)
DEFAULT_METHODS = ("integrated_gradients",)
#: What is explained: the bag logit of the target class; the cell's own attention (log attention weight: what
#: ranked it among the top cells); or its contribution to the target logit (attention x the logit of the cell
#: alone as a bag, ABMIL's instance contribution).
SCORES = ("bag", "attention", "contribution")
#: Whose logit is explained: the class the model predicted (what a user asks: "why this diagnosis?") or the
#: patient's true class (the pointing game of Zhang et al. 2018 explains the ground-truth category, so that it
#: scores the explanation method rather than the classifier's mistakes).
TARGETS = ("predicted", "true")
METHOD_LABELS = {"gradcam": "Grad-CAM", "integrated_gradients": "integrated gradients", "occlusion": "occlusion"}
#: What a map of each score shows, for the explanation page ({target}: the class explained).
SCORE_LABELS = {"bag": "the {target} class's bag logit (bright = pixels that raised the diagnosis)",
                "attention": "the cell's own attention (bright = pixels that made the model pick this cell)",
                "contribution": "the cell's contribution to the {target} class's logit (attention x the cell's own "
                                "logit; bright = pixels that raised it)"}  # fmt: skip


@dataclass(frozen=True)
class PixelConfig(Config):
    """How pixel explanations are computed and scored.

    Attributes:
        methods: attribution methods, from ``gradcam``, ``integrated_gradients`` and ``occlusion`` (a patch of
            background colour slid over the crop; the map is the mean drop of the explained score).
        cells_per_patient: top-attention cells explained per patient.
        ig_steps: integration points of integrated gradients.
        min_side: Grad-CAM uses the deepest convolutional map with at least this many positions per side.
        tolerance: pointing game: pixels (crop grid) between the map's maximum and the mask that still hit.
        smooth: Gaussian sigma (crop pixels) applied to integrated-gradient maps before their maximum is taken.
        ig_noise_samples: SmoothGrad over integrated gradients (Smilkov et al. 2017; captum's NoiseTunnel): the
            attributions averaged over this many copies of the crop with Gaussian pixel noise; 0: plain IG.
        ig_noise_sigma: the noise's standard deviation as a share of the pixel range (0..255).
        feature_tolerance: least cosine similarity between a crop's re-encoded feature and the bank's row;
            below it the crop is not the one the bank was extracted from, and the cell is not explained.
        device: where the encoder and aggregator run (``cpu``, ``cuda``, ``auto``).
        target: the class explained, ``predicted`` or ``true`` (the patient's label; for scoring explanations
            with the pointing game; an unlabelled patient is skipped with a note).
        score: the score explained (:data:`SCORES`): ``bag`` (the target class's bag logit), ``attention`` (the
            cell's log attention weight) or ``contribution`` (attention x the target logit of the cell alone).
        occlusion_patch: side of the occluding patch, in pixels of the crop (scaled to the encoder's input
            grid, so a map means the same at every input size: 12 px of a 96 px crop is 28 px at 224).
        occlusion_stride: step between patches, in pixels of the crop (scaled likewise).
        encoder_weights: the weights file of the bank's encoder when the engine does not package it (an encoder
            trained with ``milcore encoder train``); it must be the file the bank was extracted with (its SHA-256
            is checked against the bank's encoder fingerprint). ``None``: the registered encoder's own weights.
    """

    config_key = "pixel explanation option"

    methods: tuple[str, ...] = option(DEFAULT_METHODS, choices=METHODS, min_items=1)
    cells_per_patient: int = option(3, low=1, high=64)
    ig_steps: int = option(16, low=2, high=512)
    min_side: int = option(6, low=1)
    tolerance: float = option(3.0, low=0)
    smooth: float = option(1.0, low=0)
    ig_noise_samples: int = option(0, low=0, high=256)
    ig_noise_sigma: float = option(0.15, low=0, high=1)
    feature_tolerance: float = option(0.98, low=-1, high=1)
    device: str = option("cpu")
    target: str = option("predicted", choices=TARGETS)
    score: str = option("attention", choices=SCORES)
    occlusion_patch: int = option(12, low=1, high=512)
    occlusion_stride: int = option(4, low=1, high=512)
    encoder_weights: str | None = option(None)


# ------------------------------------------------------------------------------------------- the bag score


class BagScore:
    """The class logits of one bag as a function of one of its cells' features (a fold model or an ensemble).

    Args:
        models: aggregators (``forward(x, ptr, coords) -> MILOutput``); their logits are averaged.
        x: (N, D) the bag's features (the bank's rows).
        coords: (N, 2) coordinates for models that use them, or ``None``.
    """

    def __init__(self, models: Sequence[nn.Module], x: torch.Tensor, coords: torch.Tensor | None = None,
                 kind: str = "bag") -> None:  # fmt: skip
        if kind not in SCORES:
            raise ValueError(f"score {kind!r} is not one of {', '.join(SCORES)}")
        self.models = [m.eval() for m in models]
        self.x = x.float()  # (N, D)
        self.coords = coords
        self.kind = kind

    @property
    def size(self) -> int:
        """N, the bag's cell count."""
        return int(self.x.shape[0])

    def _outputs(self, feats: torch.Tensor, row: int) -> tuple[list[Any], torch.Tensor]:
        """The models' outputs on m copies of the bag, each with row ``row`` replaced; the replaced rows (m,)."""
        m, n = feats.shape[0], self.size
        rows = row + torch.arange(m, device=feats.device) * n  # (m,)
        x = self.x.to(feats.device).repeat(m, 1).index_put((rows,), feats.float())  # (m*N, D)
        ptr = torch.arange(m + 1, device=feats.device, dtype=torch.long) * n  # (m+1,)
        coords = self.coords.to(feats.device).repeat(m, 1) if self.coords is not None else None
        return [model(x, ptr, coords) for model in self.models], rows

    def __call__(self, feats: torch.Tensor, row: int) -> torch.Tensor:
        """(m, D) features for row ``row`` -> (m, C) logits of m copies of the bag, each with that row replaced."""
        outs, _ = self._outputs(feats, row)
        return torch.stack([o.logits for o in outs]).mean(0)  # (m, C)

    def value(self, feats: torch.Tensor, row: int, target: int) -> torch.Tensor:
        """(m, D) features for row ``row`` -> (m,) the explained score (:attr:`kind`) of each copy of the bag.

        Raises:
            ValueError: an attention score for a model that returns no attention.
        """
        if self.kind == "bag":
            return self(feats, row)[:, target]
        outs, rows = self._outputs(feats, row)
        weights = []
        for o in outs:
            a = getattr(o, "attention", None)
            if a is None:
                raise ValueError(f"score {self.kind!r} needs the model's attention; it returns none")
            weights.append((a if a.dim() == 1 else a.mean(-1))[rows].float())  # (m,)
        if self.kind == "attention":
            return torch.stack([torch.log(w.clamp_min(1e-12)) for w in weights]).mean(0)
        m = feats.shape[0]
        ptr = torch.arange(m + 1, device=feats.device, dtype=torch.long)  # m bags of one cell
        coords = self.coords[row].to(feats.device).expand(m, -1) if self.coords is not None else None
        alone = [model(feats.float(), ptr, coords).logits[:, target] for model in self.models]  # each (m,)
        return torch.stack([w * s for w, s in zip(weights, alone, strict=True)]).mean(0)


# ------------------------------------------------------------------------------------------- Grad-CAM


def gradcam_layer(module: nn.Module, input_size: int, min_side: int) -> tuple[str, nn.Module] | None:
    """The deepest sub-module (called once per forward, not a padding) whose output is a feature map of at
    least ``min_side`` positions per side and more than 3 channels; the deepest map of any size when none is
    that large; ``None`` when the encoder has no convolutional map (a ViT, ``toy``, ``morphology``)."""
    seen: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    calls: dict[str, int] = {}
    hooks = []
    for name, sub in module.named_modules():
        if not name:
            continue

        def hook(mod: nn.Module, args: tuple, out: object, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1
            first = args[0] if args and torch.is_tensor(args[0]) else None
            padded = first is not None and first.dim() == 4 and out.shape[-1] > first.shape[-1]  # type: ignore[union-attr]
            if torch.is_tensor(out) and out.dim() == 4 and out.shape[1] > 3 and not padded:
                seen.append((name, mod, tuple(out.shape)))

        hooks.append(sub.register_forward_hook(hook))
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        with torch.no_grad():
            module(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    maps = [(n, m, s) for n, m, s in seen if calls.get(n) == 1]
    if not maps:
        return None
    large = [(n, m) for n, m, s in maps if min(s[2], s[3]) >= min_side]
    return large[-1] if large else maps[-1][:2]


def gradcam(encoder: nn.Module, layer: nn.Module, pixels: torch.Tensor, score: BagScore, row: int,
            target: int) -> np.ndarray:  # fmt: skip
    """Grad-CAM of the bag's ``target`` logit for one cell.

    Args:
        encoder: (1, 3, S, S) float pixels (0..255) -> (1, D).
        layer: the sub-module of ``encoder`` whose output map is weighted (:func:`gradcam_layer`).
        pixels: (3, S, S) the transformed crop (uint8 or float).
        score: the bag score.
        row: the cell's row in the bag.
        target: the class.

    Returns:
        (S, S) non-negative map on the encoder's input grid.
    """
    store: dict[str, torch.Tensor] = {}

    def keep(mod: nn.Module, args: object, out: torch.Tensor) -> None:
        out.retain_grad()
        store["a"] = out

    handle = layer.register_forward_hook(keep)
    try:
        x = pixels.float().unsqueeze(0).to(score.x.device).requires_grad_(True)  # (1, 3, S, S)
        logit = score.value(encoder(x), row, target)[0]
        logit.backward()
    finally:
        handle.remove()
    a = store["a"]  # (1, K, h, w)
    weights = a.grad.mean(dim=(2, 3), keepdim=True)  # (1, K, 1, 1)
    cam = torch.relu((weights * a).sum(1, keepdim=True)).detach()  # (1, 1, h, w)
    size = pixels.shape[-2:]
    cam = torch.nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam[0, 0].cpu().numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------- integrated gradients


def background_baseline(pixels: torch.Tensor) -> torch.Tensor:
    """A crop of plain plasma: each channel filled with the median of the crop's brightest quarter of pixels."""
    x = pixels.float()  # (3, S, S)
    bright = x.mean(0).flatten()
    keep = bright >= torch.quantile(bright, 0.75)
    colour = x.flatten(1)[:, keep].median(dim=1).values  # (3,)
    return colour.view(3, 1, 1).expand_as(x).clone()


@dataclass(frozen=True)
class IGResult:
    """Integrated gradients of one cell.

    Attributes:
        attribution: (3, S, S) per-pixel, per-channel attributions.
        delta: logit(crop) - logit(baseline) of the target class.
        completeness_error: |sum(attribution) - delta| / max(|delta|, 1e-6).
    """

    attribution: np.ndarray
    delta: float
    completeness_error: float

    def saliency(self) -> np.ndarray:
        """(S, S) evidence for the class: the positive part of the channel sum."""
        return np.maximum(self.attribution.sum(0), 0.0).astype(np.float32)


def smoothgrad_ig(encoder: nn.Module, pixels: torch.Tensor, score: BagScore, row: int, target: int,
                  steps: int = 16, samples: int = 8, sigma: float = 0.15, seed: int = 0) -> IGResult:  # fmt: skip
    """SmoothGrad over integrated gradients: :func:`integrated_gradients` of ``samples`` noisy copies of the crop
    (Gaussian noise of ``sigma`` x 255 per pixel, clipped to 0..255; the baseline stays the clean crop's), averaged.
    ``delta`` and the completeness error are those of the averages."""
    gen = torch.Generator().manual_seed(seed)
    base = background_baseline(pixels)
    runs = []
    for _ in range(max(1, samples)):
        noisy = (pixels.float() + torch.randn(pixels.shape, generator=gen) * sigma * 255).clamp(0, 255)
        runs.append(integrated_gradients(encoder, noisy, score, row, target, steps, base))
    attribution = np.mean([r.attribution for r in runs], axis=0)
    delta = float(np.mean([r.delta for r in runs]))
    error = abs(float(attribution.sum()) - delta) / max(abs(delta), 1e-6)
    return IGResult(attribution.astype(np.float32), delta, error)


def integrated_gradients(encoder: nn.Module, pixels: torch.Tensor, score: BagScore, row: int, target: int,
                         steps: int = 16, baseline: torch.Tensor | None = None,
                         max_rows: int = 65536) -> IGResult:  # fmt: skip
    """Integrated gradients of the bag's ``target`` logit w.r.t. one cell's (transformed) pixels.

    Args:
        encoder: (m, 3, S, S) float pixels (0..255) -> (m, D).
        pixels: (3, S, S) the transformed crop.
        score: the bag score.
        row: the cell's row in the bag.
        target: the class.
        steps: integration points (midpoint rule).
        baseline: (3, S, S) reference crop; default :func:`background_baseline`.
        max_rows: bag rows scored per forward pass (steps are chunked to stay under it).
    """
    device = score.x.device
    x = pixels.float().to(device)  # (3, S, S)
    base = (baseline if baseline is not None else background_baseline(pixels)).float().to(device)
    alphas = (torch.arange(steps, dtype=torch.float32, device=device) + 0.5) / steps  # (steps,)
    grads = torch.zeros_like(x)
    chunk = max(1, min(steps, max_rows // max(score.size, 1)))
    for start in range(0, steps, chunk):
        a = alphas[start : start + chunk].view(-1, 1, 1, 1)
        path = (base + a * (x - base)).requires_grad_(True)  # (m, 3, S, S)
        logits = score.value(encoder(path), row, target)  # (m,)
        (g,) = torch.autograd.grad(logits.sum(), path)
        grads += g.sum(0)
    attribution = ((x - base) * grads / steps).detach()  # (3, S, S)
    with torch.no_grad():
        ends = score.value(encoder(torch.stack([x, base])), row, target)  # (2,)
    delta = float(ends[0] - ends[1])
    error = abs(float(attribution.sum()) - delta) / max(abs(delta), 1e-6)
    return IGResult(attribution.cpu().numpy().astype(np.float32), delta, error)


# ------------------------------------------------------------------------------------------- occlusion


def occlusion_window(patch: int, stride: int, crop_side: int, input_side: int) -> tuple[int, int]:
    """A patch and stride given in crop pixels -> the same on the encoder's input grid (the transform resizes the
    crop's shorter side, ``crop_side``, to ``input_side``); each at least 1 pixel."""
    scale = input_side / max(crop_side, 1)
    return max(1, round(patch * scale)), max(1, round(stride * scale))


def occlusion(encoder: nn.Module, pixels: torch.Tensor, score: BagScore, row: int, target: int, patch: int = 12,
              stride: int = 4, baseline: torch.Tensor | None = None, max_rows: int = 65536) -> np.ndarray:  # fmt: skip
    """Occlusion map (Zeiler & Fergus 2014): a ``patch`` x ``patch`` square of the baseline (plain plasma) slid over
    the crop by ``stride``; each pixel gets the mean drop of the explained score over the patches covering it.

    Needs no gradient, so it also explains encoders whose gradients are noisy or flat.

    Args:
        encoder: (m, 3, S, S) float pixels (0..255) -> (m, D).
        pixels: (3, S, S) the transformed crop.
        score: the bag score (its :attr:`BagScore.kind` is explained).
        row: the cell's row in the bag.
        target: the class.
        patch: side of the square (pixels of the encoder's input grid).
        stride: step between squares (the last square always touches the far edge).
        baseline: (3, S, S) the fill; default :func:`background_baseline`.
        max_rows: bag rows scored per forward pass.

    Returns:
        (S, S) signed map (positive: occluding there lowers the score).
    """
    device = score.x.device
    x = pixels.float().to(device)  # (3, S, S)
    base = (baseline if baseline is not None else background_baseline(pixels)).float().to(device)
    h, w = x.shape[-2:]
    ph, pw = min(patch, h), min(patch, w)
    ys = sorted({*range(0, h - ph + 1, stride), h - ph})
    xs = sorted({*range(0, w - pw + 1, stride), w - pw})
    windows = [(i, j) for i in ys for j in xs]
    total = torch.zeros(h, w, device=device)
    count = torch.zeros(h, w, device=device)
    chunk = max(1, min(64, max_rows // max(score.size, 1)))
    with torch.no_grad():
        ref = score.value(encoder(x.unsqueeze(0)), row, target)[0]
        for start in range(0, len(windows), chunk):
            part = windows[start : start + chunk]
            imgs = x.unsqueeze(0).repeat(len(part), 1, 1, 1)  # (k, 3, S, S)
            for t, (i, j) in enumerate(part):
                imgs[t, :, i : i + ph, j : j + pw] = base[:, i : i + ph, j : j + pw]
            drops = ref - score.value(encoder(imgs), row, target)  # (k,)
            for t, (i, j) in enumerate(part):
                total[i : i + ph, j : j + pw] += drops[t]
                count[i : i + ph, j : j + pw] += 1
    return (total / count.clamp_min(1)).cpu().numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------- erasure check


def ring_colour(crop: np.ndarray, region: np.ndarray, cell: np.ndarray | None = None, width: int = 2) -> np.ndarray:
    """(3,) median colour of the pixels within ``width`` px around ``region`` (inside ``cell`` when given): the
    surrounding cytoplasm of a feature inside a cell."""
    from scipy.ndimage import binary_dilation

    region = np.asarray(region, dtype=bool)
    ring = binary_dilation(region, iterations=width) & ~region
    if cell is not None and (ring & cell).any():
        ring &= np.asarray(cell, dtype=bool)
    if not ring.any():
        ring = ~region
    return np.median(np.asarray(crop, dtype=np.float32)[ring], axis=0)


def erase(crop: np.ndarray, region: np.ndarray, cell: np.ndarray | None = None) -> np.ndarray:
    """The crop with ``region`` filled with its surrounding colour (:func:`ring_colour`); (h, w, 3) uint8."""
    out = np.asarray(crop, dtype=np.uint8).copy()
    region = np.asarray(region, dtype=bool)
    if region.any():
        out[region] = np.clip(np.round(ring_colour(crop, region, cell)), 0, 255).astype(np.uint8)
    return out


def shifted_region(mask: np.ndarray, cell: np.ndarray, rng: np.random.Generator, tries: int = 200) -> np.ndarray | None:
    """The mask moved to a random place where it lies inside the cell and overlaps the original least (a control
    region of the same shape and area); ``None`` when no shift keeps it inside the cell."""
    mask, cell = np.asarray(mask, dtype=bool), np.asarray(cell, dtype=bool)
    ys, xs = np.nonzero(mask)
    cy, cx = np.nonzero(cell)
    if not len(ys) or not len(cy):
        return None
    h, w = mask.shape
    lo_y, hi_y = cy.min() - ys.min(), cy.max() - ys.max()  # shifts that keep the mask's box in the cell's
    lo_x, hi_x = cx.min() - xs.min(), cx.max() - xs.max()
    if hi_y < lo_y or hi_x < lo_x:
        return None
    best, best_overlap = None, None
    for _ in range(tries):
        dy, dx = int(rng.integers(lo_y, hi_y + 1)), int(rng.integers(lo_x, hi_x + 1))
        ny, nx = ys + dy, xs + dx
        if ny.min() < 0 or nx.min() < 0 or ny.max() >= h or nx.max() >= w or not cell[ny, nx].all():
            continue
        overlap = int(mask[ny, nx].sum())
        if best_overlap is None or overlap < best_overlap:
            best = np.zeros_like(mask)
            best[ny, nx] = True
            best_overlap = overlap
            if overlap == 0:
                break
    return best


# ------------------------------------------------------------------------------------------- maps and scoring


def to_crop_grid(saliency: np.ndarray, crop_shape: tuple[int, int]) -> np.ndarray:
    """Map an (S, S) map on the encoder's input grid back onto an (h, w) crop (inverse of resize-shorter-side
    then centre-crop; the parts of the crop the transform cut off get 0)."""
    from PIL import Image

    s = saliency.shape[0]
    h, w = crop_shape
    if (h, w) == saliency.shape:
        return saliency.astype(np.float32)
    scale = s / min(h, w)
    nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
    top, left = (nh - s) // 2, (nw - s) // 2
    full = np.zeros((nh, nw), dtype=np.float32)
    full[top : top + s, left : left + s] = saliency
    return np.asarray(Image.fromarray(full, mode="F").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def smooth(saliency: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (``sigma`` in pixels; 0 leaves the map as it is)."""
    if sigma <= 0:
        return saliency
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(saliency.astype(np.float32), sigma)


def peak(saliency: np.ndarray) -> tuple[int, int]:
    """(y, x) of the map's maximum (the first one in row-major order)."""
    y, x = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    return int(y), int(x)


@dataclass(frozen=True)
class Pointing:
    """The pointing game of one map against one mask.

    Attributes:
        hit: the map's maximum lies within ``tolerance`` pixels of the mask (never for an empty map).
        peak: (y, x) of the maximum.
        distance: pixels from the maximum to the mask (0 inside).
        chance_centre: whether the crop's centre would hit.
        chance_cell: share of the cell's pixels that would hit (a uniformly random point of the cell).
        empty: the map has no positive value.
        mass: share of the map's positive mass inside the mask (relevance mass, Arras et al. 2022).
        mass_chance: the mask's share of the cell (the mass of a map spread evenly over the cell).
    """

    hit: bool
    peak: tuple[int, int]
    distance: float
    chance_centre: bool
    chance_cell: float
    empty: bool = False
    mass: float = 0.0
    mass_chance: float = 0.0


def pointing_game(saliency: np.ndarray, mask: np.ndarray, tolerance: float = 3.0,
                  cell: np.ndarray | None = None) -> Pointing:  # fmt: skip
    """Score a map against a ground-truth mask (both (h, w); ``cell``: the cell body for the chance level).

    Raises:
        ValueError: shapes differ or the mask is empty.
    """
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, dtype=bool)
    if saliency.shape != mask.shape:
        raise ValueError(f"map {saliency.shape} and mask {mask.shape} differ in shape")
    if not mask.any():
        raise ValueError("empty mask")
    dist = distance_transform_edt(~mask)  # (h, w) pixels to the mask
    y, x = peak(saliency)
    near = dist <= tolerance
    h, w = mask.shape
    body = np.asarray(cell, dtype=bool) if cell is not None and np.any(cell) else np.ones_like(mask)
    empty = not float(saliency.max()) > 0  # no positive evidence anywhere: no point to score
    positive = np.maximum(saliency, 0.0)
    total = float(positive.sum())
    mass = float(positive[mask].sum()) / total if total > 0 else 0.0
    mass_chance = float((mask & body).sum()) / float((mask | body).sum())
    return Pointing(bool(near[y, x]) and not empty, (y, x), float(dist[y, x]), bool(near[h // 2, w // 2]),
                    float(near[body].mean()), empty, mass, mass_chance)  # fmt: skip


def overlay(crop: np.ndarray, saliency: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.55,
            cmap: str = "inferno") -> np.ndarray:  # fmt: skip
    """The crop with the map blended over it (normalised to its maximum), the maximum marked by a cyan cross
    and, when given, the ground-truth mask outlined in green; (h, w, 3) uint8."""
    from matplotlib import colormaps

    crop = np.asarray(crop, dtype=np.float32)
    top = float(saliency.max())
    norm = saliency / top if top > 0 else np.zeros_like(saliency)
    heat = colormaps[cmap](norm)[..., :3].astype(np.float32) * 255.0  # (h, w, 3)
    a = (alpha * np.sqrt(np.clip(norm, 0, 1)))[..., None]
    out = crop * (1 - a) + heat * a
    if mask is not None and np.any(mask):
        from scipy.ndimage import binary_erosion

        m = np.asarray(mask, dtype=bool)
        out[m & ~binary_erosion(m)] = (40.0, 230.0, 60.0)
    if top <= 0:
        return np.clip(out, 0, 255).astype(np.uint8)
    y, x = peak(saliency)
    h, w = norm.shape
    for d in range(-3, 4):
        out[y, min(max(x + d, 0), w - 1)] = out[min(max(y + d, 0), h - 1), x] = (0.0, 255.0, 255.0)
    return np.clip(out, 0, 255).astype(np.uint8)


def encode_pixels(transform: Callable[[np.ndarray], torch.Tensor], crop: np.ndarray) -> torch.Tensor:
    """The encoder's transform of one crop: (3, S, S) uint8."""
    return transform(np.ascontiguousarray(crop, dtype=np.uint8))
