"""Procedural renderer of single-cell crops (white and red cells) for the synthetic cohort.

A crop shows one centred cell on a plasma background with neighbouring red cells cut by the frame,
as in the single-cell crops of the Munich AML cohort. The cell's morphology comes from
:mod:`feature_cache.sources.synthetic_vocab`; a ``subtlety`` in 0..1 moves an abnormal cell toward
the normal cell type it mimics (0: textbook; 1: indistinguishable). A :class:`SiteStyle` applies a
site's stain, illumination and focus. :meth:`CellRenderer.render` can record what it drew (a
:class:`~feature_cache.sources.synthetic_attributes.CellTruth`: attribute values and masks) without
drawing any extra random number, so the pixels do not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from feature_cache.sources.synthetic_attributes import CellTruth
from feature_cache.sources.synthetic_paint import (
    Canvas,
    ellipse_field,
    segment_points,
    smooth_noise_bank,
    soft,
    wobbly_field,
)
from feature_cache.sources.synthetic_vocab import RED_CELLS, WHITE_CELLS, RedCellSpec, WhiteCellSpec

PLASMA = (234.0, 224.0, 229.0)
PALE = (242.0, 222.0, 222.0)
PALE_CHROMATIN = (205.0, 175.0, 220.0)
NUCLEOLUS = (170.0, 150.0, 205.0)
VACUOLE = (243.0, 238.0, 246.0)
AUER = (172.0, 32.0, 82.0)


@dataclass(frozen=True)
class SiteStyle:
    """A site's acquisition: stain colour mixing, brightness, gamma, illumination gradient and blur.

    Attributes:
        matrix: 3 x 3 colour mixing applied to RGB in 0..1 (row-major, output = M @ rgb).
        offset: per-channel offset in 0..1 units.
        gamma: gamma applied after mixing.
        illumination: amplitude of a linear illumination gradient across the crop.
        illumination_angle: direction of that gradient (radians).
        blur: 0 (sharp) .. 1 (strong 3x3 box blur mixed in).
        noise: amplitude of pixel noise (grey levels).
    """

    matrix: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    gamma: float = 1.0
    illumination: float = 0.0
    illumination_angle: float = 0.0
    blur: float = 0.0
    noise: float = 2.0

    @staticmethod
    def sample(rng: np.random.Generator, strength: float) -> SiteStyle:
        """A random site style; ``strength`` 0 gives the reference site, 1 a clearly shifted one."""
        mix = np.eye(3) + strength * rng.normal(0.0, 0.07, size=(3, 3))
        return SiteStyle(
            matrix=tuple(float(v) for v in mix.ravel()),
            offset=tuple(float(v) for v in strength * rng.normal(0.0, 0.03, size=3)),
            gamma=float(np.exp(strength * rng.normal(0.0, 0.15))),
            illumination=float(strength * rng.uniform(0.0, 0.12)),
            illumination_angle=float(rng.uniform(0.0, 2 * np.pi)),
            blur=float(np.clip(strength * rng.uniform(0.0, 0.9), 0.0, 1.0)),
            noise=float(2.0 + strength * rng.uniform(0.0, 3.0)),
        )


@dataclass
class _Drawn:
    """A white cell being drawn: its specs, subtlety, geometry and masks (for granules, vacuoles, rods)."""

    spec: WhiteCellSpec
    mimic: WhiteCellSpec
    t: float
    cx: float
    cy: float
    R: float
    rx: float
    ry: float
    angle: float
    inside: np.ndarray  # (S, S) cell-body alpha
    nucleus: np.ndarray  # (S, S) nucleus alpha

    def lerp(self, name: str, rng: np.random.Generator) -> float:
        """Sample attribute ``name`` from the spec and its mimic and blend them by the subtlety."""
        return _lerp(_u(rng, getattr(self.spec, name)), _u(rng, getattr(self.mimic, name)), self.t)


def _u(rng: np.random.Generator, rng_range: tuple[float, float]) -> float:
    lo, hi = rng_range
    return lo if hi <= lo else float(rng.uniform(lo, hi))


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _lerp_rgb(a: tuple[float, ...], b: tuple[float, ...], t: float) -> np.ndarray:
    return np.asarray(a, dtype=np.float32) * (1 - t) + np.asarray(b, dtype=np.float32) * t


class CellRenderer:
    """Renders crops of any vocabulary cell type; deterministic given its seed and the caller's RNG.

    Args:
        size: crop side in pixels (sizes in the vocabulary are for 96; other sizes scale them).
        seed: seed of the shared texture banks (identical in every worker process).
    """

    def __init__(self, size: int = 96, seed: int = 0) -> None:
        self.size = size
        self.scale = size / 96.0
        bank_rng = np.random.default_rng([seed, 0x5EED])
        side = 2 * size
        self._fine = smooth_noise_bank(bank_rng, 8, side, sigma=0.9 * self.scale)
        self._coarse = smooth_noise_bank(bank_rng, 8, side, sigma=2.2 * self.scale)
        self._styles: dict[SiteStyle, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._draw_neighbours = True
        self._truth: CellTruth | None = None
        self._plasma = np.broadcast_to(np.asarray(PLASMA, dtype=np.float32), (size, size, 3)).copy()
        self._sprites = self._neighbour_sprites(np.random.default_rng([seed, 0x5B1E]), count=48)

    def clear_style_cache(self) -> None:
        """Forget precomputed style maps (call after each patient when styles vary per patient)."""
        self._styles.clear()

    # ------------------------------------------------------------------ textures
    def _patch(self, bank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        i = int(rng.integers(len(bank)))
        oy, ox = (int(v) for v in rng.integers(0, self.size, size=2))
        return bank[i, oy : oy + self.size, ox : ox + self.size]  # (S, S) view

    # ------------------------------------------------------------------ public API
    def render(
        self,
        cell_type: str,
        rng: np.random.Generator,
        subtlety: float = 0.0,
        style: SiteStyle | None = None,
        neighbours: bool = True,
        truth: CellTruth | None = None,
    ) -> np.ndarray:
        """Render one crop.

        Args:
            cell_type: a key of ``WHITE_CELLS`` or ``RED_CELLS``.
            rng: the caller's generator (advanced by this call).
            subtlety: 0..1, how far an abnormal cell is moved toward the normal type it mimics.
            style: the site's acquisition style; ``None`` for the reference site.
            neighbours: draw the neighbouring red cells (off only for measurements).
            truth: filled with what was drawn (values, and masks if it keeps them); the pixels and the
                generator's state are the same with or without it.

        Returns:
            (S, S, 3) uint8 RGB crop.
        """
        self._truth = truth
        try:
            return self._render(cell_type, rng, subtlety, style, neighbours)
        finally:
            self._truth = None

    def _render(
        self, cell_type: str, rng: np.random.Generator, subtlety: float, style: SiteStyle | None, neighbours: bool
    ) -> np.ndarray:
        canvas = Canvas(self.size, self._plasma * np.float32(rng.uniform(0.98, 1.01)))
        self._draw_neighbours = neighbours
        t = float(np.clip(subtlety, 0.0, 1.0)) * float(rng.uniform(0.6, 1.0)) if subtlety > 0 else 0.0
        if cell_type in WHITE_CELLS:
            spec = WHITE_CELLS[cell_type]
            mimic = WHITE_CELLS[spec.mimic] if spec.mimic and t > 0 else spec
            self._white(canvas, spec, mimic, t, rng)
        elif cell_type in RED_CELLS:
            rspec = RED_CELLS[cell_type]
            rmimic = RED_CELLS[rspec.mimic] if rspec.mimic and t > 0 else rspec
            self._red_crop(canvas, rspec, rmimic, t, rng)
        else:
            raise KeyError(cell_type)
        return self._finish(canvas.img, rng, style or SiteStyle())

    # ------------------------------------------------------------------ red cells
    def _red(
        self,
        canvas: Canvas,
        spec: RedCellSpec,
        cx: float,
        cy: float,
        rng: np.random.Generator,
        mimic: RedCellSpec | None = None,
        t: float = 0.0,
    ) -> float:
        """Draw one red cell centred at (cx, cy); returns its radius."""
        mimic = mimic or spec
        s = self.scale
        r = _lerp(_u(rng, spec.radius), _u(rng, mimic.radius), t) * s
        aspect = _lerp(_u(rng, spec.aspect), _u(rng, mimic.aspect), t)
        pallor = _lerp(_u(rng, spec.pallor), _u(rng, mimic.pallor), t)
        rgb = _lerp_rgb(spec.rgb, mimic.rgb, t) * rng.uniform(0.97, 1.03, size=3).astype(np.float32)
        shape = mimic.shape if (t > 0.5 and rng.random() < t) else spec.shape
        angle = float(rng.uniform(0, np.pi))
        rx, ry = r * math.sqrt(aspect), r / math.sqrt(aspect)
        tail = r * float(rng.uniform(1.0, 1.6)) if shape == "teardrop" else 0.0
        bbox = canvas.box(cx, cy, max(rx, ry) + tail)
        if bbox is None:
            return r
        dx, dy = canvas.grid(bbox, cx, cy)
        field, rho = ellipse_field(dx, dy, rx, ry, angle)
        if shape == "sickle":
            shift = 0.75 * ry
            bx, by = -math.sin(angle) * shift, math.cos(angle) * shift
            bite, _ = ellipse_field(dx - bx, dy - by, rx * 1.02, ry * 1.05, angle)
            field = np.minimum(field, -bite)
        elif shape == "fragment":
            nx, ny = math.cos(angle), math.sin(angle)
            field = np.minimum(field, dx * nx + dy * ny + r * float(rng.uniform(-0.1, 0.3)))
            bx, by = -ny * r * 1.1, nx * r * 1.1
            bite, _ = ellipse_field(dx - bx, dy - by, r * 0.7, r * 0.7, 0.0)
            field = np.minimum(field, -bite)
        elif shape == "teardrop":
            ux, uy = math.cos(angle), math.sin(angle)
            along = dx * ux + dy * uy
            across = np.abs(-dx * uy + dy * ux)
            length = r + tail
            width = 0.55 * r * np.clip(1.0 - along / length, 0.0, 1.0)
            tail_field = np.minimum(np.minimum(width - across, length - along), along)
            field = np.maximum(field, tail_field)
        if self._truth is not None:
            self._record_red(bbox, field, r, aspect, pallor, rgb, shape)
        color = np.broadcast_to(rgb, (*dx.shape, 3)).copy()
        color *= (1.0 - 0.06 * np.clip(rho, 0, 1))[..., None]
        if shape == "target":
            ring = soft((pallor - rho) * r, 1.5) * soft((rho - 0.24) * r, 1.2)
            color += (np.asarray(PALE, dtype=np.float32) - color) * (0.85 * ring)[..., None]
        elif pallor > 0:
            p = soft((pallor - rho) * r, 2.5) * 0.75
            color += (np.asarray(PALE, dtype=np.float32) - color) * p[..., None]
        canvas.blend(bbox, soft(field, 1.1) * 0.96, color)
        return r

    def _record_red(self, bbox: tuple[int, int, int, int], field: np.ndarray, r: float, aspect: float,
                    pallor: float, rgb: np.ndarray, shape: str) -> None:  # fmt: skip
        truth = self._truth
        assert truth is not None
        truth.lineage = "rbc"
        truth.values.update(radius=r / self.scale, aspect=aspect, pallor=pallor, rgb_sum=float(rgb.sum()), shape=shape)
        if truth.keep_masks:
            y0, y1, x0, x1 = bbox
            mask = np.zeros((self.size, self.size), dtype=bool)
            mask[y0:y1, x0:x1] = soft(field, 1.1) > 0.5
            truth.add_mask("cell", mask)

    def _neighbour_sprites(self, rng: np.random.Generator, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Pre-rendered normal red cells (alpha, colour) used as neighbours in every crop."""
        disc = RED_CELLS["discocyte"]
        side = int(2 * disc.radius[1] * self.scale * 1.1 + 6) | 1
        sprites = []
        for _ in range(count):
            on_black, on_white = Canvas(side, (0.0, 0.0, 0.0)), Canvas(side, (255.0, 255.0, 255.0))
            state = rng.bit_generator.state
            self._red(on_black, disc, side / 2, side / 2, rng)
            rng.bit_generator.state = state
            self._red(on_white, disc, side / 2, side / 2, rng)
            # black: c*a ; white: 255*(1-a) + c*a  ->  a = 1 - (white - black) / 255
            alpha = np.clip(1.0 - (on_white.img[..., 0] - on_black.img[..., 0]) / 255.0, 0.0, 1.0)  # (h, w)
            color = on_black.img / np.maximum(alpha, 1e-3)[..., None]  # (h, w, 3) un-premultiplied
            sprites.append((alpha.astype(np.float32), color.astype(np.float32)))
        return sprites

    def _neighbours(self, canvas: Canvas, rng: np.random.Generator, inner: float, count: int) -> None:
        """Normal red cells around the centre, at least ``inner`` pixels away, cut by the frame."""
        if not self._draw_neighbours:
            return
        radius = RED_CELLS["discocyte"].radius[1] * self.scale
        c = self.size / 2
        picks = rng.integers(0, len(self._sprites), size=count)
        angles = rng.uniform(0, 2 * np.pi, size=count)
        dists = inner + rng.uniform(0.4, 1.3, size=count) * radius
        for k, angle, dist in zip(picks, angles, dists, strict=True):
            alpha, color = self._sprites[k]
            canvas.stamp(int(c + dist * math.cos(angle)), int(c + dist * math.sin(angle)), alpha, color)

    def _red_crop(
        self, canvas: Canvas, spec: RedCellSpec, mimic: RedCellSpec, t: float, rng: np.random.Generator
    ) -> None:
        c = self.size / 2
        self._neighbours(canvas, rng, inner=spec.radius[1] * self.scale * 1.6, count=int(rng.integers(3, 7)))
        jx, jy = rng.uniform(-2, 2, size=2) * self.scale
        self._red(canvas, spec, c + jx, c + jy, rng, mimic, t)

    # ------------------------------------------------------------------ white cells
    def _white(
        self, canvas: Canvas, spec: WhiteCellSpec, mimic: WhiteCellSpec, t: float, rng: np.random.Generator
    ) -> None:
        s, c = self.scale, self.size / 2
        R = _lerp(_u(rng, spec.radius), _u(rng, mimic.radius), t) * s
        self._neighbours(canvas, rng, inner=R * 0.75, count=int(rng.integers(2, 6)))
        elong = _lerp(_u(rng, spec.elongation), _u(rng, mimic.elongation), t)
        irregular = _lerp(_u(rng, spec.irregularity), _u(rng, mimic.irregularity), t)
        angle = float(rng.uniform(0, np.pi))
        cx, cy = c + rng.uniform(-2.5, 2.5) * s, c + rng.uniform(-2.5, 2.5) * s
        rx, ry = R * math.sqrt(elong), R / math.sqrt(elong)
        harmonics = np.stack([irregular * rng.uniform(0.3, 1.0, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1)
        bbox = canvas.box(cx, cy, max(rx, ry) * (1 + 3 * irregular))
        assert bbox is not None
        dx, dy = canvas.grid(bbox, cx, cy)
        body = soft(wobbly_field(dx, dy, rx, ry, angle, harmonics), 1.2)  # (h, w)
        cyto = _lerp_rgb(spec.cytoplasm_rgb, mimic.cytoplasm_rgb, t) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
        tex_amp = _lerp(_u(rng, spec.cytoplasm_texture), _u(rng, mimic.cytoplasm_texture), t)
        y0, y1, x0, x1 = bbox
        tex = self._patch(self._coarse, rng)[y0:y1, x0:x1]
        canvas.blend(bbox, body, cyto * (1.0 + tex_amp * tex[..., None]))
        nucleus = self._nucleus(canvas, spec, mimic, t, rng, cx, cy, R)  # (S, S) alpha
        inside = np.zeros((self.size, self.size), dtype=np.float32)
        inside[y0:y1, x0:x1] = body
        if self._truth is not None:
            granule_rgb = _lerp_rgb(spec.granule_rgb, mimic.granule_rgb, t)
            self._truth.values.update(
                radius=R / s, elongation=elong, irregularity=irregular, cytoplasm_texture=tex_amp,
                cytoplasm_r=float(cyto[0]), cytoplasm_g=float(cyto[1]), cytoplasm_b=float(cyto[2]),
                granule_r=float(granule_rgb[0]), granule_g=float(granule_rgb[1]), granule_b=float(granule_rgb[2]),
                granule_density=0.0, granule_size=0.0, granules=0, vacuoles=0, auer_rods=0,
            )  # fmt: skip
            if self._truth.keep_masks:
                self._truth.add_mask("cell", inside > 0.5)
        cell = _Drawn(spec, mimic, t, cx, cy, R, rx, ry, angle, inside, nucleus)
        self._granules(canvas, cell, rng)
        self._vacuoles(canvas, cell, rng)
        self._auer(canvas, cell, rng)

    def _nucleus(
        self,
        canvas: Canvas,
        spec: WhiteCellSpec,
        mimic: WhiteCellSpec,
        t: float,
        rng: np.random.Generator,
        cx: float,
        cy: float,
        R: float,
    ) -> np.ndarray:
        shape = mimic.nucleus_shape if rng.random() < t else spec.nucleus_shape
        Rn = R * _lerp(_u(rng, spec.nc_ratio), _u(rng, mimic.nc_ratio), t)
        off = _lerp(_u(rng, spec.nucleus_offset), _u(rng, mimic.nucleus_offset), t) * max(R - Rn, 0.0) * 0.9
        phi = float(rng.uniform(0, 2 * np.pi))
        nx, ny = cx + off * math.cos(phi), cy + off * math.sin(phi)
        bbox = canvas.box(nx, ny, Rn * 1.25)
        assert bbox is not None
        dx, dy = canvas.grid(bbox, nx, ny)
        rot = float(rng.uniform(0, 2 * np.pi))
        field = self._nucleus_field(shape, dx, dy, Rn, rot, rng)
        alpha = soft(field, 1.0) * 0.97
        density = _lerp(_u(rng, spec.chromatin_density), _u(rng, mimic.chromatin_density), t)
        coarse = _lerp(_u(rng, spec.chromatin_coarseness), _u(rng, mimic.chromatin_coarseness), t)
        base = _lerp_rgb(PALE_CHROMATIN, _lerp_rgb(spec.chromatin_rgb, mimic.chromatin_rgb, t), density)
        y0, y1, x0, x1 = bbox
        tex = coarse * self._patch(self._coarse, rng)[y0:y1, x0:x1] + (1 - coarse) * 0.5 * self._patch(
            self._fine, rng
        )[y0:y1, x0:x1]
        canvas.blend(bbox, alpha, base * (1.0 - (0.06 + 0.16 * coarse) * tex[..., None]))
        full = np.zeros((self.size, self.size), dtype=np.float32)
        full[y0:y1, x0:x1] = alpha
        n_nucleoli = round(_lerp(_u(rng, spec.nucleoli), _u(rng, mimic.nucleoli), t))
        if self._truth is not None:
            self._truth.values.update(nucleus_shape=shape, nc_ratio=Rn / R, chromatin_density=density,
                                      chromatin_coarseness=coarse, nucleoli=n_nucleoli)  # fmt: skip
            if self._truth.keep_masks:
                self._truth.add_mask("nucleus", full > 0.5)
        for _ in range(n_nucleoli):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.45) * Rn
            px, py = nx + d * math.cos(a), ny + d * math.sin(a)
            rr = float(rng.uniform(1.8, 3.0)) * self.scale
            nb = canvas.box(px, py, rr)
            if nb is None:
                continue
            ddx, ddy = canvas.grid(nb, px, py)
            f, _ = ellipse_field(ddx, ddy, rr, rr * 0.85, float(rng.uniform(0, np.pi)))
            canvas.blend(nb, soft(f, 0.8) * 0.55 * full[nb[0] : nb[1], nb[2] : nb[3]], NUCLEOLUS)
        return full

    @staticmethod
    def _nucleus_field(
        shape: str, dx: np.ndarray, dy: np.ndarray, Rn: float, rot: float, rng: np.random.Generator
    ) -> np.ndarray:
        """Signed inside-distance of the nucleus: union of lobes, minus an indentation."""
        if shape == "round":
            f, _ = ellipse_field(dx, dy, Rn * float(rng.uniform(1.0, 1.08)), Rn * 0.95, rot)
            return f
        if shape == "indented":
            f, _ = ellipse_field(dx, dy, Rn * 1.05, Rn * 0.92, rot)
            ix, iy = Rn * 1.0 * math.cos(rot + np.pi / 2), Rn * 1.0 * math.sin(rot + np.pi / 2)
            bite, _ = ellipse_field(dx - ix, dy - iy, Rn * 0.55, Rn * 0.55, 0.0)
            return np.minimum(f, -bite)
        if shape == "bilobed":
            lobes = [(-0.45, 0.0, 0.58), (0.45, 0.0, 0.58), (0.0, 0.0, 0.2)]
        elif shape == "band":
            lobes = [
                (0.62 * math.cos(a), 0.62 * math.sin(a), 0.3)
                for a in np.linspace(-0.6 * np.pi, 0.6 * np.pi, 8)
            ]
        elif shape == "multilobed":
            n = int(rng.integers(3, 6))
            angles = np.linspace(-0.65 * np.pi, 0.65 * np.pi, n)
            lobes = [(0.62 * math.cos(a), 0.62 * math.sin(a), 0.36) for a in angles]
            mids = (angles[:-1] + angles[1:]) / 2
            lobes += [(0.62 * math.cos(a), 0.62 * math.sin(a), 0.1) for a in mids]
        else:
            raise ValueError(f"unknown nucleus shape {shape!r}")
        cr, sr = math.cos(rot), math.sin(rot)
        field = None
        for lx, ly, lr in lobes:
            ox, oy = Rn * (lx * cr - ly * sr), Rn * (lx * sr + ly * cr)
            f, _ = ellipse_field(dx - ox, dy - oy, Rn * lr, Rn * lr, 0.0)
            field = f if field is None else np.maximum(field, f)
        assert field is not None
        return field

    def _points_in_cell(
        self,
        rng: np.random.Generator,
        n: int,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        angle: float,
        inside: np.ndarray,
        nucleus: np.ndarray | None,
        margin: float = 0.9,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Integer positions inside the cell body (and outside the nucleus unless ``nucleus`` is None)."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        rad = np.sqrt(rng.random(n)) * margin
        th = rng.uniform(0, 2 * np.pi, n)
        u, v = rad * rx * np.cos(th), rad * ry * np.sin(th)
        c, s = math.cos(angle), math.sin(angle)
        xs = np.clip((cx + u * c - v * s).astype(np.int64), 0, self.size - 1)
        ys = np.clip((cy + u * s + v * c).astype(np.int64), 0, self.size - 1)
        keep = inside[ys, xs] > 0.6
        if nucleus is not None:
            keep &= nucleus[ys, xs] < 0.3
        return ys[keep], xs[keep]

    def _granules(self, canvas: Canvas, cell: _Drawn, rng: np.random.Generator) -> None:
        spec, mimic, t = cell.spec, cell.mimic, cell.t
        density = cell.lerp("granule_density", rng)
        if density <= 0:
            return
        over = spec.granules_over_nucleus and not (t > 0.5 and rng.random() < t)
        n = int(density * math.pi * cell.R * cell.R / 100.0)
        ys, xs = self._points_in_cell(rng, n, cell.cx, cell.cy, cell.rx, cell.ry, cell.angle, cell.inside,
                                      None if over else cell.nucleus)  # fmt: skip
        size = max(1, round(cell.lerp("granule_size", rng) * self.scale))
        canvas.dots(ys, xs, size, _lerp_rgb(spec.granule_rgb, mimic.granule_rgb, t), 0.7)
        if self._truth is not None:
            self._truth.values.update(granule_density=density, granule_size=size / self.scale, granules=len(ys))
            if len(ys):
                self._truth.add_dots("granules", self.size, ys, xs, size)

    def _vacuoles(self, canvas: Canvas, cell: _Drawn, rng: np.random.Generator) -> None:
        n = round(cell.lerp("vacuoles", rng))
        r = cell.R * 0.85
        ys, xs = self._points_in_cell(rng, n, cell.cx, cell.cy, r, r, 0.0, cell.inside, cell.nucleus)
        for y, x in zip(ys, xs, strict=True):
            rr = float(rng.uniform(1.5, 3.2)) * self.scale
            bbox = canvas.box(float(x), float(y), rr)
            if bbox is None:
                continue
            if self._truth is not None:
                self._truth.values["vacuoles"] = int(self._truth.values.get("vacuoles", 0)) + 1
            dx, dy = canvas.grid(bbox, float(x) + 0.5, float(y) + 0.5)
            f, _ = ellipse_field(dx, dy, rr, rr, 0.0)
            canvas.blend(bbox, soft(f, 0.8) * 0.75, VACUOLE)

    def _auer(self, canvas: Canvas, cell: _Drawn, rng: np.random.Generator) -> None:
        spec = cell.spec
        if spec.auer_rods[1] <= 0 or rng.random() > spec.auer_probability:
            return
        n = round(cell.lerp("auer_rods", rng))
        if n <= 0:
            return
        r = cell.R * 0.8
        anchors_y, anchors_x = self._points_in_cell(rng, 8, cell.cx, cell.cy, r, r, 0.0, cell.inside, cell.nucleus)
        if len(anchors_y) == 0:
            anchors_y, anchors_x = np.array([int(cell.cy)]), np.array([int(cell.cx + 0.7 * cell.R)])
        base_angle = float(rng.uniform(0, np.pi))
        for k in range(n):
            i = 0 if spec.auer_bundle else k % len(anchors_y)
            ax = float(anchors_x[i]) + (rng.normal(0, 1.5) if spec.auer_bundle else 0.0)
            ay = float(anchors_y[i]) + (rng.normal(0, 1.5) if spec.auer_bundle else 0.0)
            a = base_angle + (rng.normal(0, 0.25) if spec.auer_bundle else rng.uniform(0, np.pi))
            half = float(rng.uniform(4.5, 8.0)) * self.scale
            ys, xs = segment_points(
                ax - half * math.cos(a), ay - half * math.sin(a), ax + half * math.cos(a), ay + half * math.sin(a)
            )
            canvas.dots(ys, xs, 1, AUER, 0.9)
            canvas.dots(ys + 1, xs, 1, AUER, 0.45)
            if self._truth is not None:
                self._truth.values["auer_rods"] = int(self._truth.values.get("auer_rods", 0)) + 1
                self._truth.add_dots("auer_rod", self.size, np.concatenate([ys, ys + 1]), np.concatenate([xs, xs]))

    # ------------------------------------------------------------------ site style
    def _style_maps(self, style: SiteStyle) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        cached = self._styles.get(style)
        if cached is None:
            mix = np.asarray(style.matrix, dtype=np.float32).reshape(3, 3).T  # rgb_out = rgb_in @ mix
            yy, xx = np.mgrid[0 : self.size, 0 : self.size].astype(np.float32) / self.size - 0.5
            ca, sa = math.cos(style.illumination_angle), math.sin(style.illumination_angle)
            illum = (1.0 + style.illumination * (xx * ca + yy * sa) * 2.0).astype(np.float32)
            lut = None
            if style.gamma != 1.0:  # gamma through a 256-entry table: no per-pixel pow
                lut = (255.0 * (np.arange(256, dtype=np.float32) / 255.0) ** style.gamma).astype(np.float32)
            offset = np.asarray(style.offset, dtype=np.float32) * 255.0
            cached = (mix, offset, illum[..., None], lut)
            self._styles[style] = cached
        return cached

    def _finish(self, img: np.ndarray, rng: np.random.Generator, style: SiteStyle) -> np.ndarray:
        """Apply the site style and pixel noise (all in 0..255 units); returns uint8."""
        mix, offset, illum, lut = self._style_maps(style)
        x = (img.reshape(-1, 3) @ mix).reshape(img.shape)  # (S, S, 3); one BLAS call
        x += offset
        if lut is not None:
            np.clip(x, 0.0, 255.0, out=x)
            x = lut[x.astype(np.uint8)]
        x *= illum
        if style.blur > 0:
            blurred = x.copy()
            blurred[1:] += x[:-1]
            blurred[:-1] += x[1:]
            rows = blurred.copy()
            blurred[:, 1:] += rows[:, :-1]
            blurred[:, :-1] += rows[:, 1:]
            x *= 1.0 - style.blur
            x += blurred * (style.blur / 9.0)
        x += (style.noise * self._patch(self._fine, rng))[..., None]
        np.clip(x, 0.0, 255.0, out=x)
        return x.astype(np.uint8)
