"""HTTP replies the simulated upstream sends: error bodies, no-image bodies and success shapes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from simulator.images import ImageCache, ImageSpec, RenderedImage

_BLOB_TOKEN = re.compile(rb'"@@sim-blob-(\d+)@@"')
_THOUGHT_COLOUR = (200, 200, 200)
_SECOND_COLOUR = (180, 90, 60)
_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_TRUNCATED_JSON = b'{"candidates": [{"content": {"role": "model", "parts": [{"inlineData": {"mimeT'
_SIMPLE_ERRORS = {
    "400": ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    "401": ("PERMISSION_DENIED", "API key not valid. Please pass a valid API key."),
    "403": ("PERMISSION_DENIED", "The caller does not have permission."),
    "500": ("INTERNAL", "An internal error has occurred."),
    "502": ("UNAVAILABLE", "Bad gateway: the upstream connection failed."),
    "503": ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    "504": ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}
_NO_IMAGE_BODIES: dict[str, Any] = {
    "safety": {
        "candidates": [{"content": {"role": "model", "parts": []}, "finishReason": "IMAGE_SAFETY"}],
        "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12},
    },
    "blocked": {
        "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12},
    },
    "textonly": {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [{"text": "I can't create that image, but here is a description instead."}],
                },
                "finishReason": "STOP",
            }
        ]
    },
}


@dataclass(frozen=True)
class Reply:
    """Status, body chunks written in order (big images are not copied) and Content-Type, if any."""

    status: int
    chunks: tuple[bytes, ...]
    content_type: str | None = "application/json"

    @property
    def length(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


def json_reply(status: int, payload: Any, blobs: tuple[bytes, ...] = ()) -> Reply:
    """JSON reply; the string blob_ref(i) anywhere in payload is replaced by the JSON string of blobs[i]."""
    pieces = _BLOB_TOKEN.split(json.dumps(payload).encode())
    chunks: list[bytes] = []
    for i, piece in enumerate(pieces):
        chunks.extend((piece,) if i % 2 == 0 else (b'"', blobs[int(piece)], b'"'))
    return Reply(status, tuple(chunk for chunk in chunks if chunk))


def blob_ref(index: int) -> str:
    """Placeholder for blobs[index] in a json_reply payload."""
    return f"@@sim-blob-{index}@@"


def error_reply(code: int, status: str, message: str, details: list[dict] | None = None) -> Reply:
    """Gemini error body {"error": {code, message, status[, details]}}."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return json_reply(code, {"error": error})


def failure_reply(item: str, model: str, retry_delay: str) -> Reply:
    """Reply for every script item except ok and timeout (which ends with the 504 reply)."""
    if item == "429":
        return error_reply(
            429,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
            [
                _quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
            ],
        )
    if item == "429day":
        details = [_quota_failure("GenerateRequestsPerDayPerProjectPerModel")]
        return error_reply(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", details)
    if item == "404":
        message = f"models/{model} is not found for API version v1beta."
        return error_reply(404, "NOT_FOUND", message)
    if item == "500list":
        error = {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}
        return json_reply(500, [{"error": error}])
    if item in _SIMPLE_ERRORS:
        return error_reply(int(item), *_SIMPLE_ERRORS[item])
    if item in _NO_IMAGE_BODIES:
        return json_reply(200, _NO_IMAGE_BODIES[item])
    if item == "malformed":
        return Reply(200, (_TRUNCATED_JSON,))
    if item == "html":
        return Reply(502, (_HTML_502,), "text/html")
    if item == "empty":
        return Reply(503, (), None)
    raise ValueError(f"no failure reply for {item!r}")


def success_reply(
    shape: str,
    model: str,
    spec: ImageSpec,
    images: ImageCache,
    image_url: Callable[[RenderedImage], str],
) -> Reply:
    """A 200 carrying the image drawn from spec in the given response shape."""
    final = images.get(replace(spec, image_format="jpeg") if shape == "mislabeled" else spec)
    if shape in ("camel", "mislabeled"):
        mime_type = "image/png" if shape == "mislabeled" else final.mime_type
        parts = [_text("Here is your image."), _camel_image(mime_type, 0)]
        return json_reply(200, _gemini_camel(parts, model), (final.b64,))
    if shape == "snake":
        return json_reply(200, _gemini_snake(final.mime_type, model), (final.b64,))
    if shape == "thought":
        thought_spec = ImageSpec(max(1, spec.width // 4), max(1, spec.height // 4), colour=_THOUGHT_COLOUR)
        thought = images.get(thought_spec)
        parts = [
            {"text": "Planning the composition...", "thought": True},
            {**_camel_image(thought.mime_type, 0), "thought": True},
            _camel_image(final.mime_type, 1),
        ]
        return json_reply(200, _gemini_camel(parts, model), (thought.b64, final.b64))
    if shape == "two":
        second = images.get(replace(spec, colour=_SECOND_COLOUR))
        parts = [
            _camel_image(final.mime_type, 0),
            _text("And a second take."),
            _camel_image(second.mime_type, 1),
        ]
        return json_reply(200, _gemini_camel(parts, model), (final.b64, second.b64))
    if shape == "openai":
        data = {"b64_json": blob_ref(0), "revised_prompt": ""}
        return json_reply(200, {"created": int(time.time()), "data": [data]}, (final.b64,))
    if shape == "openai_url":
        data = {"url": image_url(final), "revised_prompt": ""}
        return json_reply(200, {"created": int(time.time()), "data": [data]})
    raise ValueError(f"unknown shape {shape!r}")


def _quota_failure(quota_id: str) -> dict:
    return {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": quota_id}]}


def _text(text: str) -> dict:
    return {"text": text}


def _camel_image(mime_type: str, blob: int) -> dict:
    return {"inlineData": {"mimeType": mime_type, "data": blob_ref(blob)}}


def _gemini_camel(parts: list[dict], model: str) -> dict:
    images = sum("inlineData" in part for part in parts)
    return {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {
            "promptTokenCount": 1290,
            "candidatesTokenCount": 1290 * images,
            "totalTokenCount": 1290 * (images + 1),
        },
        "modelVersion": model,
    }


def _gemini_snake(mime_type: str, model: str) -> dict:
    parts = [{"text": "Here is your image."}, {"inline_data": {"mime_type": mime_type, "data": blob_ref(0)}}]
    return {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finish_reason": "STOP", "index": 0}],
        "usage_metadata": {
            "prompt_token_count": 1290,
            "candidates_token_count": 1290,
            "total_token_count": 2580,
        },
        "model_version": model,
    }
