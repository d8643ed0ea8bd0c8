"""Write an RGB image as a tiled, pyramidal TIFF that OpenSlide opens as ``generic-tiff``.

PIL cannot write tiled TIFFs and ``tifffile`` is not a dependency, so this is a small writer of
baseline TIFF 6.0: one tiled IFD per pyramid level (each half the size of the previous one),
8-bit RGB, Deflate (or no) compression, and the resolution in pixels per centimetre so OpenSlide
reports ``openslide.mpp-x``. Used to turn real smear fields into test slides.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from feature_cache.errors import InvalidArgumentError

_SHORT, _LONG, _RATIONAL, _ASCII = 3, 4, 5, 2


def _levels(rgb: np.ndarray, tile: int, max_levels: int | None) -> list[np.ndarray]:
    from PIL import Image

    levels = [rgb]
    while max(levels[-1].shape[:2]) > tile and (max_levels is None or len(levels) < max_levels):
        img = Image.fromarray(levels[-1])
        levels.append(np.asarray(img.reduce(2)))  # 2x2 box filter
    return levels


def _tiles(level: np.ndarray, tile: int, compress: bool) -> list[bytes]:
    h, w = level.shape[:2]
    out = []
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            block = np.zeros((tile, tile, 3), dtype=np.uint8)  # edge tiles are padded
            part = level[ty : ty + tile, tx : tx + tile]
            block[: part.shape[0], : part.shape[1]] = part
            raw = block.tobytes()
            out.append(zlib.compress(raw, 6) if compress else raw)
    return out


def write_pyramidal_tiff(
    path: str | Path,
    rgb: np.ndarray,
    tile: int = 256,
    mpp: float | None = None,
    levels: int | None = None,
    compression: str = "deflate",
    description: str = "milcore pyramidal TIFF",
) -> Path:
    """Write ``rgb`` as a tiled pyramidal TIFF.

    Args:
        path: output file (``.tif``/``.tiff``).
        rgb: (H, W, 3) uint8 level-0 image.
        tile: tile side in pixels (a multiple of 16, as TIFF requires).
        mpp: microns per level-0 pixel, written as X/Y resolution (pixels per cm).
        levels: number of pyramid levels (default: halve until the image fits one tile).
        compression: ``"deflate"`` or ``"none"``.
        description: ImageDescription of level 0.

    Returns:
        The written path.

    Raises:
        InvalidArgumentError: bad image, tile size or compression.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidArgumentError(f"write_pyramidal_tiff needs (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if tile <= 0 or tile % 16:
        raise InvalidArgumentError(f"tile must be a positive multiple of 16, got {tile}")
    if compression not in ("deflate", "none"):
        raise InvalidArgumentError(f"compression must be 'deflate' or 'none', got {compression!r}")
    path = Path(path)
    pyramid = _levels(np.ascontiguousarray(rgb), tile, levels)
    buf = bytearray(b"II*\x00\x00\x00\x00\x00")  # header; first IFD offset patched below
    prev_next_ptr = 4
    for index, level in enumerate(pyramid):
        h, w = level.shape[:2]
        tiles = _tiles(level, tile, compression == "deflate")
        offsets = []
        for data in tiles:
            offsets.append(len(buf))
            buf += data
            if len(buf) % 2:
                buf += b"\x00"
        extra = bytearray()  # out-of-line tag values, placed after the IFD

        entries: list[tuple[int, int, int, bytes]] = []

        def tag(code: int, typ: int, values: list[int] | bytes, entries=entries) -> None:
            if typ == _ASCII:
                payload, count = bytes(values) + b"\x00", len(values) + 1
            elif typ == _RATIONAL:
                payload, count = b"".join(struct.pack("<II", *v) for v in values), len(values)  # type: ignore[misc]
            else:
                fmt = "<H" if typ == _SHORT else "<I"
                payload, count = b"".join(struct.pack(fmt, v) for v in values), len(values)
            entries.append((code, typ, count, payload))

        tag(254, _LONG, [0 if index == 0 else 1])  # NewSubfileType: reduced-resolution levels
        tag(256, _LONG, [w])
        tag(257, _LONG, [h])
        tag(258, _SHORT, [8, 8, 8])
        tag(259, _SHORT, [8 if compression == "deflate" else 1])
        tag(262, _SHORT, [2])  # RGB
        if index == 0:
            tag(270, _ASCII, description.encode("ascii", "replace"))
        tag(277, _SHORT, [3])
        if mpp:
            per_cm = round(1e4 / mpp * 1000 / (2**index))
            tag(282, _RATIONAL, [(per_cm, 1000)])  # type: ignore[list-item]
            tag(283, _RATIONAL, [(per_cm, 1000)])  # type: ignore[list-item]
        tag(284, _SHORT, [1])  # chunky
        if mpp:
            tag(296, _SHORT, [3])  # centimetre
        tag(322, _LONG, [tile])
        tag(323, _LONG, [tile])
        tag(324, _LONG, offsets)
        tag(325, _LONG, [len(t) for t in tiles])
        ifd_at = len(buf)
        n = len(entries)
        extra_at = ifd_at + 2 + 12 * n + 4
        body = bytearray(struct.pack("<H", n))
        for code, typ, count, payload in entries:
            if len(payload) <= 4:
                body += struct.pack("<HHI", code, typ, count) + payload.ljust(4, b"\x00")
            else:
                body += struct.pack("<HHII", code, typ, count, extra_at + len(extra))
                extra += payload
                if len(extra) % 2:
                    extra += b"\x00"
        struct.pack_into("<I", buf, prev_next_ptr, ifd_at)
        prev_next_ptr = ifd_at + len(body)
        buf += body + b"\x00\x00\x00\x00" + extra
    path.write_bytes(bytes(buf))
    return path
