"""Reading images as RGB uint8, whatever their mode: grayscale, palette, RGBA, 16-bit, float, CMYK.

Transparent pixels are composited onto white (the colour of glass in a bright-field smear).
16-bit images are scaled by 257 (65535 -> 255); float images by their range ([0, 1] or [0, 255]).
Truncated or corrupt files raise :class:`ImageReadError`, which sources turn into a recorded
failure. The size is checked from the header before decoding (:class:`ImageTooLargeError` above
``max_pixels``); PIL's decompression-bomb warning never reaches the user raw: an image above PIL's
limit is logged with its name (or refused by ``max_pixels``), one above twice the limit is refused.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


log = logging.getLogger(__name__)


class ImageReadError(Exception):
    """An image file could not be decoded; the message says why in one line."""


class ImageTooLargeError(ImageReadError):
    """An image's header gives more pixels than allowed; nothing was decoded."""


def is_image_file(path: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> bool:
    """Whether ``path`` is a visible file whose suffix (case-insensitive) is an image suffix."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in suffixes


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        finite = arr[np.isfinite(arr)]
        top = 1.0 if finite.size == 0 or float(finite.max()) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).round().astype(np.uint8)
    info = np.iinfo(arr.dtype)
    if info.max <= 255:
        return np.clip(arr, 0, 255).astype(np.uint8)
    if int(arr.max(initial=0)) <= 255:  # a wide type holding 8-bit values
        return np.clip(arr, 0, 255).astype(np.uint8)
    return np.clip(arr.astype(np.float64) / 257.0, 0, 255).round().astype(np.uint8)  # 16-bit range


def pil_to_rgb(img: PILImage.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an (H, W, 3) uint8 RGB array."""
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def read_rgb(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file into an (H, W, 3) uint8 RGB array (first frame of multi-page files).

    EXIF orientation is applied.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this (checked from the header, before
            decoding); ``None``: only PIL's own limit (twice ``PIL.Image.MAX_IMAGE_PIXELS``).

    Raises:
        ImageTooLargeError: more pixels than ``max_pixels`` or than PIL accepts.
        ImageReadError: missing, truncated, corrupt or empty.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with warnings.catch_warnings():  # the size is checked below, by name, instead of PIL's raw warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLargeError(f"{w} x {h} = {w * h} pixels, above the limit of {max_pixels}")
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                log.warning("%s: decoding a large image (%d x %d = %d pixels, %.1f GB as RGB)", path, w, h, w * h,
                            3 * w * h / 1e9)  # fmt: skip
            img.load()  # decode now: truncated data fails here
            img = ImageOps.exif_transpose(img) if img.getexif() else img
            rgb = pil_to_rgb(img)
    except UnidentifiedImageError:
        raise ImageReadError("not an image file PIL can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large for PIL to decode ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise ImageReadError(f"cannot decode image ({type(exc).__name__}: {exc})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(f"empty image of shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def crop_centered(image: np.ndarray, x: float, y: float, size: int, fill: np.ndarray | None = None) -> np.ndarray:
    """A ``size`` x ``size`` crop centred on (x, y); parts outside the image are filled.

    Args:
        image: (H, W, 3) uint8 image.
        x: centre column.
        y: centre row.
        size: crop side in pixels.
        fill: (3,) colour of pixels outside the image (default: white).

    Returns:
        (size, size, 3) uint8 crop.
    """
    h, w = image.shape[:2]
    x0 = round(x) - size // 2
    y0 = round(y) - size // 2
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[...] = 255 if fill is None else np.asarray(fill, dtype=np.uint8)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + size, w), min(y0 + size, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out
