"""The body of ``generate``: the upstream's own (Gemini-native) request, which the server accepts as is.

Input images go inline (``inline_data``: base64 and a MIME type sniffed from their first bytes, never
guessed from a file name).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, TypedDict

from imagegen.errors import InvalidImageError

DEFAULT_MODEL = "gemini-2.5-flash-image"
ImageInput = str | PathLike[str] | bytes

# The types the server takes as input (README: inline_data.mime_type), each by its magic bytes.
_HEIF_BRANDS = {b"mif1": "image/heif", b"msf1": "image/heif", b"heic": "image/heic", b"heix": "image/heic"}


def sniff_mime_type(data: bytes) -> str:
    """The image type of ``data`` from its first bytes; InvalidImageError if it is none we can send."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[data[8:12]]
    raise InvalidImageError("not a PNG, JPEG, WebP, HEIC or HEIF image")


def image_part(image: ImageInput) -> dict[str, Any]:
    """An ``inline_data`` part of ``image`` (a path or the image's bytes)."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    try:
        mime_type = sniff_mime_type(data)
    except InvalidImageError as exc:
        what = "bytes" if isinstance(image, bytes) else str(image)
        raise InvalidImageError(f"{what}: {exc}") from None
    return {"inline_data": {"mime_type": mime_type, "data": base64.b64encode(data).decode("ascii")}}


class GenerateOptions(TypedDict, total=False):
    """The options of ``generate`` besides the prompt (and the call's ``idempotency_key``)."""

    aspect_ratio: str  # 1:1 (default), 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9
    image_size: str  # 1K (default), 2K, 4K
    images: Iterable[ImageInput]  # input images: paths or bytes
    model: str  # default: DEFAULT_MODEL
    response_modalities: Sequence[str]  # default: TEXT and IMAGE
    metadata: Mapping[str, Any] | None  # echoed back on the task
    webhook_url: str | None
    webhook_events: Sequence[str] | None  # running, succeeded, failed, canceled


def generation_body(
    prompt: str,
    *,
    aspect_ratio: str = "1:1",
    image_size: str = "1K",
    images: Iterable[ImageInput] = (),
    model: str = DEFAULT_MODEL,
    response_modalities: Sequence[str] = ("TEXT", "IMAGE"),
    metadata: Mapping[str, Any] | None = None,
    webhook_url: str | None = None,
    webhook_events: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The request body of one prompt."""
    parts: list[dict[str, Any]] = [{"text": prompt}, *(image_part(image) for image in images)]
    body: dict[str, Any] = {
        "model": model,
        "contents": [{"role": "user", "parts": parts}],
        "generationConfig": {
            "responseModalities": list(response_modalities),
            "imageConfig": {"aspectRatio": aspect_ratio, "imageSize": image_size},
        },
    }
    extra = {"metadata": metadata, "webhook_url": webhook_url, "webhook_events": webhook_events}
    body.update((name, value) for name, value in extra.items() if value is not None)
    return body
