"""Vectorised numpy painting primitives for the synthetic cohort (no per-pixel Python loops).

Every primitive works on the bounding box of the shape only and blends a soft-edged alpha mask
into a float32 RGB canvas, so that a 96 x 96 crop with a white cell, its granules, Auer rods and
neighbouring red cells renders in well under a millisecond.
"""

from __future__ import annotations

import numpy as np

RGBLike = np.ndarray | tuple[float, float, float]


class Canvas:
    """A float32 RGB image (values 0..255) with bounding-box blending helpers.

    Args:
        size: side length in pixels.
        background: fill colour.
    """

    def __init__(self, size: int, background: RGBLike | np.ndarray) -> None:
        self.size = size
        background = np.asarray(background, dtype=np.float32)
        if background.shape == (size, size, 3):
            self.img = background  # (S, S, 3), adopted without a copy
        else:
            self.img = np.empty((size, size, 3), dtype=np.float32)  # (S, S, 3)
            self.img[:] = background

    def box(self, cx: float, cy: float, radius: float) -> tuple[int, int, int, int] | None:
        """Integer bbox ``(y0, y1, x0, x1)`` of a disc, clipped to the canvas; ``None`` if outside."""
        r = radius + 2.0
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, self.size)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, self.size)
        if y0 >= y1 or x0 >= x1:
            return None
        return y0, y1, x0, x1

    def grid(self, bbox: tuple[int, int, int, int], cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre offsets ``(dx, dy)`` from ``(cx, cy)`` over ``bbox``, each (h, w)."""
        y0, y1, x0, x1 = bbox
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        return np.broadcast_to(dx, (y1 - y0, x1 - x0)), np.broadcast_to(dy, (y1 - y0, x1 - x0))

    def blend(self, bbox: tuple[int, int, int, int], alpha: np.ndarray, color: np.ndarray | RGBLike) -> None:
        """``img = img * (1 - alpha) + color * alpha`` inside ``bbox``.

        Args:
            bbox: ``(y0, y1, x0, x1)``.
            alpha: (h, w) opacity in 0..1.
            color: (3,) or (h, w, 3).
        """
        y0, y1, x0, x1 = bbox
        patch = self.img[y0:y1, x0:x1]  # (h, w, 3) view
        a = alpha[..., None]
        patch += (np.asarray(color, dtype=np.float32) - patch) * a

    def stamp(self, cx: int, cy: int, alpha: np.ndarray, color: np.ndarray) -> None:
        """Blend a pre-rendered sprite (alpha (h, w), color (h, w, 3)) centred at integer (cx, cy)."""
        h, w = alpha.shape
        y0, x0 = cy - h // 2, cx - w // 2
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = min(h, self.size - y0), min(w, self.size - x0)
        if sy0 >= sy1 or sx0 >= sx1:
            return
        patch = self.img[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1]
        a = alpha[sy0:sy1, sx0:sx1, None]
        patch += (color[sy0:sy1, sx0:sx1] - patch) * a

    def dots(self, ys: np.ndarray, xs: np.ndarray, size: int, color: RGBLike, opacity: float) -> None:
        """Square dots of ``size`` pixels at integer positions (granules, rod points)."""
        col = np.asarray(color, dtype=np.float32)
        for oy in range(size):
            for ox in range(size):
                yy = np.clip(ys + oy, 0, self.size - 1)
                xx = np.clip(xs + ox, 0, self.size - 1)
                px = self.img[yy, xx]
                self.img[yy, xx] = px + (col - px) * opacity


def soft(field: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Alpha from a signed inside-distance field (pixels; > 0 inside) with a soft edge."""
    return np.clip(field / width + 0.5, 0.0, 1.0)


def ellipse_field(
    dx: np.ndarray, dy: np.ndarray, rx: float, ry: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate signed distance inside an ellipse (pixels) and the normalised radius.

    Returns:
        ``(field, rho)``: field > 0 inside; rho = 1 on the boundary, 0 at the centre.
    """
    c, s = np.cos(angle), np.sin(angle)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    return (1.0 - rho) * min(rx, ry), rho


def wobbly_field(
    dx: np.ndarray, dy: np.ndarray, rx: float, ry: float, angle: float, harmonics: np.ndarray
) -> np.ndarray:
    """Signed inside-distance of an ellipse whose boundary wobbles with a few harmonics.

    The harmonics ``cos(k theta + phase)`` are built by the angle-addition recurrence from
    ``cos theta`` and ``sin theta`` (no ``arctan2``), which keeps a crop under a millisecond.

    Args:
        harmonics: (K, 2) amplitude and phase of harmonics 2..K+1.
    """
    c, s = np.cos(angle), np.sin(angle)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    if len(harmonics) == 0 or float(np.abs(harmonics[:, 0]).max()) < 1e-3:
        return (1.0 - rho) * min(rx, ry)
    inv = 1.0 / np.maximum(np.hypot(u, v), 1e-6)
    cos1, sin1 = u * inv, v * inv
    cos_k, sin_k = cos1 * cos1 - sin1 * sin1, 2.0 * cos1 * sin1  # k = 2
    boundary = np.ones_like(rho)
    for amp, phase in harmonics:
        boundary += amp * (cos_k * np.cos(phase) - sin_k * np.sin(phase))
        cos_k, sin_k = cos_k * cos1 - sin_k * sin1, sin_k * cos1 + cos_k * sin1
    return (boundary - rho) * min(rx, ry)


def segment_points(x0: float, y0: float, x1: float, y1: float, step: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel positions along a segment (for thin rods)."""
    n = max(int(np.hypot(x1 - x0, y1 - y0) / step), 2)
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)
    return (y0 + (y1 - y0) * t).astype(np.int64), (x0 + (x1 - x0) * t).astype(np.int64)


def smooth_noise_bank(rng: np.random.Generator, count: int, size: int, sigma: float) -> np.ndarray:
    """``count`` smooth noise fields (size, size), zero mean, unit std, made by FFT low-pass filtering."""
    white = rng.standard_normal((count, size, size)).astype(np.float32)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2)).astype(np.float32)
    fields = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=(size, size)).astype(np.float32)
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-6
    return fields
