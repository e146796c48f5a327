"""Deterministic PNG/JPEG images of a given size and approximate byte length, cached per spec.

Pixel data is a flat colour; to reach a byte target the first pixels are replaced by seeded
pseudo-random noise, which does not compress, so the file size comes from real pixel data.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
_CACHE_CAPACITY = 16
_JPEG_QUALITY = 95
_TOLERANCE = 0.01


@dataclass(frozen=True)
class ImageSpec:
    """What to draw: dimensions, format, approximate size in bytes (0 = smallest) and base colour."""

    width: int
    height: int
    image_format: str = "png"
    target_bytes: int = 0
    colour: tuple[int, int, int] = (70, 130, 180)


@dataclass(frozen=True)
class RenderedImage:
    """Encoded image bytes, their standard base64, MIME type and a stable id for URL serving."""

    data: bytes
    b64: bytes
    mime_type: str
    image_id: str


def render(spec: ImageSpec) -> RenderedImage:
    """Encode the image described by spec (uncached)."""
    data = _png(spec) if spec.image_format == "png" else _jpeg(spec)
    image_id = hashlib.sha256(repr(spec).encode()).hexdigest()[:20]
    return RenderedImage(data, base64.b64encode(data), MIME_TYPES[spec.image_format], image_id)


class ImageCache:
    """Thread-safe LRU cache of rendered images; each spec is rendered once even under concurrency."""

    def __init__(self, capacity: int = _CACHE_CAPACITY) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[ImageSpec, RenderedImage] = OrderedDict()
        self._building: dict[ImageSpec, threading.Lock] = {}

    def get(self, spec: ImageSpec) -> RenderedImage:
        with self._lock:
            if spec in self._entries:
                self._entries.move_to_end(spec)
                return self._entries[spec]
            build_lock = self._building.setdefault(spec, threading.Lock())
        with build_lock:
            with self._lock:
                if spec in self._entries:
                    return self._entries[spec]
            image = render(spec)
            with self._lock:
                self._entries[spec] = image
                while len(self._entries) > self._capacity:
                    self._entries.popitem(last=False)
                self._building.pop(spec, None)
        return image


def _noise(spec: ImageSpec, length: int) -> bytes:
    return random.Random(repr(spec)).randbytes(length)


def _png(spec: ImageSpec) -> bytes:
    flat = _encode_png(spec, 0)
    if spec.target_bytes <= len(flat):
        return flat
    raw_bytes = spec.width * spec.height * 3
    noise = min(raw_bytes, spec.target_bytes - len(flat))
    data = _encode_png(spec, noise)
    if noise < raw_bytes and abs(len(data) - spec.target_bytes) > spec.target_bytes * _TOLERANCE:
        noise = max(0, min(raw_bytes, noise + spec.target_bytes - len(data)))
        data = _encode_png(spec, noise)
    return data


def _encode_png(spec: ImageSpec, noise_bytes: int) -> bytes:
    """8-bit RGB PNG whose first noise_bytes pixel bytes are noise and the rest the flat colour."""
    stride = spec.width * 3
    flat_row = bytes(spec.colour) * spec.width
    noise = memoryview(_noise(spec, noise_bytes))
    compressor = zlib.compressobj(9)
    parts = []
    for y in range(spec.height):
        start = y * stride
        if start >= noise_bytes:
            row = flat_row
        elif start + stride <= noise_bytes:
            row = noise[start : start + stride]
        else:
            row = bytes(noise[start:noise_bytes]) + flat_row[noise_bytes - start :]
        parts.append(compressor.compress(b"\x00" + row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", spec.width, spec.height, 8, 2, 0, 0, 0)
    idat = _chunk(b"IDAT", b"".join(parts))
    return b"".join([b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), idat, _chunk(b"IEND", b"")])


def _chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(tag))
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def _jpeg(spec: ImageSpec) -> bytes:
    flat = _encode_jpeg(spec, 0)
    if spec.target_bytes <= len(flat):
        return flat
    probe_rows = min(64, spec.height)
    per_row = max(1.0, (len(_encode_jpeg(spec, probe_rows)) - len(flat)) / probe_rows)
    rows = _clamp_rows(spec, (spec.target_bytes - len(flat)) / per_row)
    data = _encode_jpeg(spec, rows)
    if rows < spec.height and abs(len(data) - spec.target_bytes) > spec.target_bytes * _TOLERANCE:
        rows = _clamp_rows(spec, rows * (spec.target_bytes - len(flat)) / max(1, len(data) - len(flat)))
        data = _encode_jpeg(spec, rows)
    return data


def _clamp_rows(spec: ImageSpec, rows: float) -> int:
    return max(0, min(spec.height, round(rows)))


def _encode_jpeg(spec: ImageSpec, noise_rows: int) -> bytes:
    """JPEG of the flat colour whose top noise_rows rows are noise."""
    image = Image.new("RGB", (spec.width, spec.height), spec.colour)
    if noise_rows:
        size = (spec.width, noise_rows)
        image.paste(Image.frombytes("RGB", size, _noise(spec, spec.width * noise_rows * 3)), (0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()
