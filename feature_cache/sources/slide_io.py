"""OpenSlide access for :mod:`.slides`: opening with clear errors, working scale, regions, smear mask."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feature_cache.errors import UserError

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi",
)  # fmt: skip
PLAUSIBLE_MPP = (0.01, 5.0)  # microns per level-0 pixel of a microscope slide
DEFAULT_RBC_PX = 100.0


@dataclass(frozen=True)
class SlideScale:
    """Where and how big the working image is.

    Attributes:
        level: pyramid level read.
        extra: further shrink after reading (level pixels per working pixel, >= 1).
        downsample: level-0 pixels per working pixel.
        width: working image width in pixels.
        height: working image height.
        mpp: microns per working pixel (``None`` when the slide has no resolution).
        rbc_px: red-cell diameter in working pixels.
    """

    level: int
    extra: float
    downsample: float
    width: int
    height: int
    mpp: float | None
    rbc_px: float


def open_slide(path: str | Path) -> Any:
    """Open a slide with OpenSlide.

    Raises:
        UserError: the file is missing or not a slide OpenSlide can read.
    """
    import openslide

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: slide file not found")
    fmt = openslide.OpenSlide.detect_format(str(path))
    if fmt is None:
        raise UserError(f"{path}: not a whole-slide image OpenSlide can read (unknown format)")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:
        raise UserError(f"{path}: OpenSlide cannot open this {fmt} slide ({exc})") from exc


def find_slides(path: Path, on_failure: Callable[..., Any]) -> dict[str, Path]:
    """Bag id (file stem) -> slide file, for one file or a folder.

    In a folder, files with a slide suffix that OpenSlide cannot read are reported through
    ``on_failure(path, reason)``; other files are ignored. DICOM files of one slide count once.

    Raises:
        UserError: ``path`` is a non-slide file, or a folder without any slide.
    """
    import openslide

    if path.is_file():
        open_slide(path).close()
        return {path.stem: path}
    if not path.is_dir():
        raise UserError(f"{path}: slide file or folder not found")
    slides: dict[str, Path] = {}
    seen_hashes: set[str] = set()
    for p in sorted(path.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in SLIDE_SUFFIXES:
            continue
        if openslide.OpenSlide.detect_format(str(p)) is None:
            on_failure(p, "not a whole-slide image OpenSlide can read (unknown format)")
            continue
        if p.suffix.lower() == ".dcm":  # the files of one DICOM slide share a quick hash
            try:
                with openslide.OpenSlide(str(p)) as s:
                    quick = s.properties.get("openslide.quickhash-1", str(p))
            except openslide.OpenSlideError as exc:
                on_failure(p, f"OpenSlide cannot open it ({exc})")
                continue
            if quick in seen_hashes:
                continue
            seen_hashes.add(quick)
        if p.stem in slides:
            raise UserError(f"{p}: same bag id (file stem) as {slides[p.stem].name}; rename one")
        slides[p.stem] = p
    if not slides:
        raise UserError(f"{path}: no slide OpenSlide can read ({', '.join(SLIDE_SUFFIXES)})")
    return slides


def slide_mpp(slide: Any) -> float | None:
    """Microns per level-0 pixel from the slide's properties, ``None`` when absent or implausible."""
    try:
        mpp = float(slide.properties.get("openslide.mpp-x", "nan"))
    except ValueError:
        return None
    if not np.isfinite(mpp) or not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return None
    return mpp


def choose_scale(
    slide: Any,
    path: Path,
    level: int | None,
    mpp: float | None,
    rbc_diameter_um: float,
    rbc_diameter_px: float | None,
) -> SlideScale:
    """Working scale for a level or a microns-per-pixel target.

    Raises:
        UserError: the level does not exist, or ``mpp`` was asked of a slide without resolution.
    """
    mpp0 = slide_mpp(slide)
    if mpp is not None:
        if mpp0 is None:
            raise UserError(f"{path}: slide has no microns-per-pixel; choose a level instead of mpp={mpp}")
        target = max(float(mpp) / mpp0, 1.0)
        lvl = int(slide.get_best_level_for_downsample(target + 1e-9))
        extra = target / float(slide.level_downsamples[lvl])
    else:
        lvl = 0 if level is None else int(level)
        if not 0 <= lvl < slide.level_count:
            raise UserError(f"{path}: level {lvl} does not exist (the slide has {slide.level_count})")
        extra = 1.0
    downsample = float(slide.level_downsamples[lvl]) * extra
    w0, h0 = slide.dimensions
    if rbc_diameter_px is not None:
        rbc0 = float(rbc_diameter_px)
    elif mpp0 is not None:
        rbc0 = rbc_diameter_um / mpp0
    else:
        log.warning("%s: no microns-per-pixel; assuming red cells of %.0f level-0 pixels", path, DEFAULT_RBC_PX)
        rbc0 = DEFAULT_RBC_PX
    return SlideScale(
        level=lvl,
        extra=extra,
        downsample=downsample,
        width=max(1, int(w0 / downsample)),
        height=max(1, int(h0 / downsample)),
        mpp=None if mpp0 is None else mpp0 * downsample,
        rbc_px=rbc0 / downsample,
    )


def read_rgb_region(
    slide: Any, scale: SlideScale, x0: float, y0: float, width: int, height: int | None = None
) -> np.ndarray:
    """(height, width, 3) uint8 RGB at the working scale, top-left (x0, y0) in working pixels.

    Pixels outside the slide (transparent in OpenSlide) come back white.
    """
    from PIL import Image

    height = width if height is None else height
    loc = (round(x0 * scale.downsample), round(y0 * scale.downsample))
    size = (max(1, int(np.ceil(width * scale.extra))), max(1, int(np.ceil(height * scale.extra))))
    rgba = slide.read_region(loc, scale.level, size)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BOX)
    return np.asarray(rgb)


def smear_mask(slide: Any, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """Smear-area mask from a low-resolution rendering of the slide.

    Stained area (summed optical density above the glass, Otsu threshold, at least 0.05) is
    smoothed, hole-filled and dilated a little, so thin monolayer areas between cells count.

    Returns:
        (h, w) bool mask and its downsample (level-0 pixels per mask pixel).
    """
    from scipy import ndimage as ndi

    from feature_cache.sources.detect_ops import background_rgb

    thumb = slide.get_thumbnail((max_side, max_side)).convert("RGB")
    rgb = np.asarray(thumb)
    down = slide.dimensions[0] / max(rgb.shape[1], 1)
    bg = background_rgb(rgb)
    od = np.log((bg + 1.0) / (rgb.astype(np.float32) + 1.0)).sum(axis=2)
    od = ndi.gaussian_filter(od, sigma=1.0)
    vals = od.ravel()
    hist, edges = np.histogram(vals, bins=128)
    p = hist / max(hist.sum(), 1)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * mids)
    between = (m0[-1] * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    threshold = max(float(mids[int(np.argmax(between))]), 0.05)
    mask = ndi.binary_fill_holes(od > threshold)
    mask = ndi.binary_dilation(mask, iterations=2)
    return mask, float(down)
