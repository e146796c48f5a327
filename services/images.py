"""Sniff an image's real type from its magic bytes and read its size from the header.

Stdlib only and never decodes pixels: only the first few hundred bytes of an image are looked at.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from services.errors import ResponseError

EXTENSIONS: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/heic": "heic",
    "image/heif": "heif",
}

_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_HEIF_BRANDS = frozenset({b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-RST7.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


@dataclass(frozen=True)
class ImageInfo:
    """An image's real type and, when the header gives it, its size in pixels."""

    mime_type: str
    extension: str
    width: int | None
    height: int | None


def sniff_mime(data: bytes) -> str | None:
    """The mime type the magic bytes announce, or None when they are not a supported image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[4:8] == b"ftyp":
        return _ftyp_mime(data)
    return None


def inspect_image(data: bytes) -> ImageInfo:
    """Type and size of an image from its header; ResponseError ``bad_upstream_response`` if unusable."""
    mime = sniff_mime(data)
    if mime is None:
        raise _bad(f"Not a PNG, JPEG, WebP, GIF or HEIC/HEIF image (first bytes: {data[:16].hex()})")
    extension = EXTENSIONS[mime]
    read_size = _SIZE_READERS.get(mime)
    if read_size is None:
        return ImageInfo(mime, extension, None, None)
    try:
        width, height = read_size(data)
    except (IndexError, ValueError, struct.error) as exc:
        raise _bad(f"Truncated or corrupt {extension} header ({len(data)} bytes): {exc}") from exc
    if width <= 0 or height <= 0:
        raise _bad(f"The {extension} header gives an empty size {width}x{height}")
    return ImageInfo(mime, extension, width, height)


def _bad(message: str) -> ResponseError:
    # Unusable image bytes on a 2xx are a flaky answer: worth another attempt.
    return ResponseError(message, code="bad_upstream_response", retryable=True)


def _ftyp_mime(data: bytes) -> str | None:
    """HEIC/HEIF from the ISO-BMFF ``ftyp`` box's major and compatible brands (AVIF is not supported)."""
    size = int.from_bytes(data[:4], "big")
    if size < 16:
        return None
    end = min(size, len(data))
    brands = {data[8:12], *(data[i : i + 4] for i in range(16, end - 3, 4))}
    if brands & _AVIF_BRANDS:
        return None
    if brands & _HEIC_BRANDS:
        return "image/heic"
    if brands & _HEIF_BRANDS:
        return "image/heif"
    return None


def _png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise ValueError("IHDR is not the first chunk")
    return struct.unpack_from(">II", data, 16)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the segments after SOI up to the first start-of-frame marker."""
    i = 2
    while True:
        if data[i] != 0xFF:
            raise ValueError(f"expected a marker at offset {i}")
        while data[i] == 0xFF:  # fill bytes
            i += 1
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):
            raise ValueError(f"marker 0x{marker:02X} before any start-of-frame")
        (length,) = struct.unpack_from(">H", data, i)
        if marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", data, i + 3)  # after length and precision
            return width, height
        if length < 2:
            raise ValueError(f"segment length {length} at offset {i}")
        i += length


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: 3-byte frame tag, start code, 14-bit sizes
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("no VP8 start code")
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature byte, then 14-bit sizes minus one
        if data[20] != 0x2F:
            raise ValueError("no VP8L signature")
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: flags, reserved, 24-bit canvas sizes minus one
        if len(data) < 30:
            raise ValueError("VP8X chunk cut short")
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise ValueError(f"unknown WebP chunk {chunk!r}")


def _gif_size(data: bytes) -> tuple[int, int]:
    return struct.unpack_from("<HH", data, 6)


_SIZE_READERS: dict[str, Callable[[bytes], tuple[int, int]]] = {
    "image/png": _png_size,
    "image/jpeg": _jpeg_size,
    "image/webp": _webp_size,
    "image/gif": _gif_size,
}
