"""Checks an incoming generation request the way the upstream does."""

from __future__ import annotations

import binascii
import json
from base64 import b64decode
from dataclasses import dataclass
from typing import Any

from simulator.dimensions import ASPECT_RATIOS, IMAGE_SIZES

INPUT_MIME_TYPES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")


class InvalidRequest(ValueError):
    """The request breaks an upstream rule; the message is returned in a 400 body."""


@dataclass(frozen=True)
class GenerationRequest:
    """The fields of a valid request the simulator acts on."""

    model: str
    aspect_ratio: str
    image_size: str
    texts: list[str]


def parse_request(body: bytes) -> GenerationRequest:
    """Parse and validate a request body, raising InvalidRequest with an upstream-like message."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"Invalid JSON payload received. {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("Invalid JSON payload received. Expected an object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("* model: required string field is missing or empty")
    texts = _check_contents(payload.get("contents"))
    generation_config = payload.get("generationConfig")
    image_config = generation_config.get("imageConfig") if isinstance(generation_config, dict) else None
    if not isinstance(image_config, dict):
        raise InvalidRequest("* generationConfig.imageConfig: required field is missing")
    _check_modalities(generation_config.get("responseModalities"))
    ratio = image_config.get("aspectRatio")
    if ratio not in ASPECT_RATIOS:
        raise InvalidRequest(f"Unsupported aspect ratio: {ratio}")
    size = image_config.get("imageSize")
    if size not in IMAGE_SIZES:
        raise InvalidRequest(f"Unsupported image size: {size}")
    return GenerationRequest(model=model, aspect_ratio=ratio, image_size=size, texts=texts)


def _check_contents(contents: Any) -> list[str]:
    """Validate contents[].parts[] and return the text parts."""
    if not isinstance(contents, list) or not contents:
        raise InvalidRequest("* contents: contents is not specified")
    texts: list[str] = []
    for i, content in enumerate(contents):
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list) or not parts:
            raise InvalidRequest(f"* contents[{i}].parts: must be a non-empty list")
        for j, part in enumerate(parts):
            where = f"contents[{i}].parts[{j}]"
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and ("inline_data" in part or "inlineData" in part):
                _check_inline_data(where, part.get("inline_data", part.get("inlineData")))
            else:
                raise InvalidRequest(f"* {where}: a part needs text or inline_data")
    return texts


def _check_inline_data(where: str, blob: Any) -> None:
    if not isinstance(blob, dict):
        raise InvalidRequest(f"* {where}.inline_data: must be an object")
    mime_type = blob.get("mime_type", blob.get("mimeType"))
    if mime_type not in INPUT_MIME_TYPES:
        raise InvalidRequest(f"* {where}.inline_data.mime_type: unsupported MIME type: {mime_type}")
    data = blob.get("data")
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"* {where}.inline_data.data: required base64 string is missing")
    try:
        b64decode(data, validate=True)
    except binascii.Error:
        raise InvalidRequest(f"* {where}.inline_data.data: invalid base64 data") from None


def _check_modalities(modalities: Any) -> None:
    """responseModalities is optional here, but when present must ask for an image."""
    if modalities is None:
        return
    if not isinstance(modalities, list) or "IMAGE" not in modalities:
        raise InvalidRequest("* generationConfig.responseModalities: must include IMAGE")
