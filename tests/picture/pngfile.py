"""A tiny PNG reader for tests: header, size, and the pixels' colours.

Pure Python (zlib and struct), so that the picture tests need no imaging
library. Reads 8-bit greyscale, RGB, palette, grey+alpha and RGBA images,
non-interlaced: what Graphviz and Chromium write (PNG spec, sections 11.2.2
and 9.2 for the filters).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


class PngError(ValueError):
    pass


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(SIGNATURE):
        raise PngError("not a PNG: bad signature")
    out, pos = [], len(SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise PngError(f"bad CRC in chunk {kind!r}")
        out.append((kind, body))
        pos += 12 + length
    return out


def size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which must come first."""
    kind, body = chunks(Path(path).read_bytes())[0]
    if kind != b"IHDR":
        raise PngError("first chunk is not IHDR")
    width, height = struct.unpack(">II", body[:8])
    return width, height


def colours(path: str | Path, step: int = 1) -> set[tuple[int, ...]]:
    """The distinct pixel values, looking at every *step*-th row and column."""
    parts = chunks(Path(path).read_bytes())
    header = parts[0][1]
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or interlace or ctype not in CHANNELS:
        raise PngError(
            f"unsupported PNG: depth {depth}, type {ctype}, interlace {interlace}"
        )
    palette = next((body for kind, body in parts if kind == b"PLTE"), b"")
    raw = zlib.decompress(b"".join(body for kind, body in parts if kind == b"IDAT"))
    bpp = CHANNELS[ctype]
    stride = width * bpp
    seen: set[tuple[int, ...]] = set()
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = _unfilter(
            raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, bpp
        )
        if y % step == 0:
            for x in range(0, width, step):
                pixel = tuple(row[x * bpp : (x + 1) * bpp])
                if ctype == 3:
                    pixel = tuple(palette[pixel[0] * 3 : pixel[0] * 3 + 3])
                seen.add(pixel)
        previous = row
    return seen


def _unfilter(kind: int, row: bytearray, prior: bytearray, bpp: int) -> bytearray:
    if kind == 0:
        return row
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        up = prior[i]
        if kind == 1:
            row[i] = (row[i] + left) & 0xFF
        elif kind == 2:
            row[i] = (row[i] + up) & 0xFF
        elif kind == 3:
            row[i] = (row[i] + ((left + up) >> 1)) & 0xFF
        elif kind == 4:
            corner = prior[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + _paeth(left, up, corner)) & 0xFF
        else:
            raise PngError(f"unknown filter type {kind}")
    return row


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c
