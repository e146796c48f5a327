"""Read the upstream's HTTP answer: the images and texts of a success, or the error it stands for.

Pure functions, no network. Success shapes: Gemini ``candidates[].content.parts[]`` in camelCase or
snake_case (also a JSON array of streamed chunks), and OpenAI-style ``{"created", "data": [...]}``.

Images are decoded straight from the body's bytes: the JSON is parsed with each long base64 value
(``data``, ``b64_json``) left in the body, and the image decoded from a view of it
(``services.json_scan``; why: bench/README.md, "The fixes", 5, target P4).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.errors import ResponseError, UpstreamError
from services.json_scan import loads_with_views
from services.retry_after import parse_retry_after

try:
    import pybase64 as _pybase64
except ImportError:  # optional: binascii does the same, slower
    _pybase64 = None  # type: ignore[assignment]  # None: the module is absent

BLOCKING_FINISH_REASONS = frozenset(
    {
        "IMAGE_SAFETY",
        "SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_RECITATION",
    }
)

_GEMINI_KEYS = frozenset(
    {
        "candidates",
        "promptFeedback",
        "prompt_feedback",
        "usageMetadata",
        "usage_metadata",
        "modelVersion",
        "model_version",
    }
)
_TEXT_LIMIT = 500
_SNIPPET_LIMIT = 200
_DURATION = re.compile(r"(\d+(?:\.\d+)?)s")


@dataclass(frozen=True)
class ImagePart:
    """One generated image: decoded bytes or a URL to fetch, never both."""

    data: bytes | None
    url: str | None
    declared_mime: str | None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.url is None):
            raise ValueError("exactly one of data and url must be set")


@dataclass(frozen=True)
class UpstreamResult:
    """What a successful answer carried; ``usage`` is the upstream's usage object, untouched."""

    images: list[ImagePart]
    texts: list[str]
    usage: dict[str, Any] | None
    finish_reason: str | None
    model_version: str | None


@dataclass
class _Collected:
    """Everything gathered from a success body, including why there may be no image."""

    images: list[ImagePart] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    model_version: str | None = None
    block_reason: str | None = None
    notes: list[str] = field(default_factory=list)


def parse_success(body: bytes | bytearray) -> UpstreamResult:
    """Images and texts of a 2xx body; raises ResponseError (or UpstreamError for an error body)."""
    try:
        payload = loads_with_views(body)
    except ValueError:
        raise _bad(f"HTTP 2xx with a non-JSON body: {_snippet(body)}") from None
    error = _error_object(payload)
    if error is not None:
        raise classify_error(_embedded_status(error), bytes(body), {})
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        collected = _collect_openai(payload)
    else:
        collected = _collect_gemini(payload)
    if not collected.images:
        raise _no_image_error(collected)
    return UpstreamResult(
        images=collected.images,
        texts=collected.texts,
        usage=collected.usage,
        finish_reason=collected.finish_reason,
        model_version=collected.model_version,
    )


def classify_error(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    """The UpstreamError a non-2xx answer stands for (code, retryable, retry_after, upstream_status)."""
    try:
        payload: Any = json.loads(body)
        is_json = True
    except ValueError:
        payload, is_json = None, False
    error = _error_object(payload) or {}
    message = _error_message(status, error, body, is_json)
    details = _dicts(error.get("details"))
    if status == 429:
        retry_after = _details_retry_delay(details)
        if retry_after is None:
            retry_after = _retry_after_header(headers)
        daily = _is_daily_quota(details)
        return UpstreamError(
            message,
            code="upstream_quota_exhausted" if daily else "upstream_rate_limited",
            retryable=not daily,
            upstream_status=status,
            retry_after=retry_after,
        )
    code, retryable = _code_for_status(status)
    return UpstreamError(message, code=code, retryable=retryable, upstream_status=status)


def encode_result(result: UpstreamResult) -> bytes:
    """An answer that ``parse_success`` reads back as ``result`` (images, texts, usage): what is saved
    when the outputs could not be uploaded, instead of the upstream's own body, which is not kept."""
    if all(image.data is not None for image in result.images):
        parts: list[dict[str, Any]] = [{"text": text} for text in result.texts]
        parts += [
            {
                "inlineData": {
                    "mimeType": image.declared_mime or "application/octet-stream",
                    "data": base64.b64encode(image.data or b"").decode("ascii"),
                }
            }
            for image in result.images
        ]
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}}
        if result.finish_reason:
            candidate["finishReason"] = result.finish_reason
        answer: dict[str, Any] = {"candidates": [candidate], "usageMetadata": result.usage}
        if result.model_version:
            answer["modelVersion"] = result.model_version
    else:  # an image to download: the OpenAI shape has URLs; texts ride along as revised prompts
        items = [
            {"b64_json": base64.b64encode(image.data).decode("ascii")}
            if image.data is not None
            else {"url": image.url}
            for image in result.images
        ]
        for item, text in zip(items, result.texts, strict=False):
            item["revised_prompt"] = text
        answer = {"created": 0, "data": items, "usage": result.usage}
    return json.dumps(answer, separators=(",", ":")).encode()


def retry_delay_seconds(value: str) -> float | None:
    """Seconds in a google.protobuf.Duration JSON string such as ``"29.72s"``; None if not one."""
    match = _DURATION.fullmatch(value.strip())
    return float(match.group(1)) if match else None


def _code_for_status(status: int) -> tuple[str, bool]:
    """Error code and retryability of any status but 429."""
    if status == 400:
        return "upstream_rejected", False
    if status in (401, 403):
        return "upstream_auth", False
    if status == 404:
        return "upstream_not_found", False
    if 400 <= status < 500 and status not in (408, 499):
        return "upstream_rejected", False
    # 408, 499, 5xx, and anything unexpected (3xx, an error object inside a 200).
    return "upstream_unavailable", True


def _bad(message: str) -> ResponseError:
    # A 2xx we cannot read is a flaky gateway: retried, and final with this code after the last attempt.
    return ResponseError(message, code="bad_upstream_response", retryable=True, upstream_status=200)


def _snippet(body: bytes | bytearray) -> str:
    """The start of a body as one line of text."""
    text = " ".join(bytes(body[: _SNIPPET_LIMIT * 4]).decode("utf-8", "replace").split())
    return text[:_SNIPPET_LIMIT]


def _clip(text: str, limit: int = _TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _get(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    return obj[camel] if camel in obj else obj.get(snake)


def _text(value: Any) -> str | None:
    """A non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _error_object(payload: Any) -> dict[str, Any] | None:
    """The ``error`` object of ``{"error": {...}}``, also inside a list; a bare string becomes a message."""
    if isinstance(payload, list):
        payload = next((item for item in _dicts(payload) if item.get("error")), None)
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str) and error:
        return {"message": error}
    return None


def _embedded_status(error: dict[str, Any]) -> int:
    """The HTTP status an error inside a 2xx body claims, or 200 when it names none."""
    code = error.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return 200


def _error_message(status: int, error: dict[str, Any], body: bytes, is_json: bool) -> str:
    message = str(error.get("message") or "").strip()
    if message:
        if status == 400:
            return message
        grpc_status = _text(error.get("status"))
        label = f"{status} {grpc_status}" if grpc_status else str(status)
        return f"Upstream {label}: {message}"
    if not body.strip():
        return f"HTTP {status} with an empty body"
    kind = "an unexpected JSON" if is_json else "a non-JSON"
    return f"HTTP {status} with {kind} body: {_snippet(body)}"


def _details_retry_delay(details: list[dict[str, Any]]) -> float | None:
    for detail in details:
        value = detail.get("retryDelay")
        if isinstance(value, str):
            return retry_delay_seconds(value)
    return None


def _retry_after_header(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header, whatever the case of its name."""
    return parse_retry_after(next((v for k, v in headers.items() if k.lower() == "retry-after"), None))


def _is_daily_quota(details: list[dict[str, Any]]) -> bool:
    return any(
        "PerDay" in str(violation.get("quotaId", ""))
        for detail in details
        for violation in _dicts(detail.get("violations"))
    )


_URL_SAFE = str.maketrans("-_", "+/")


def _strict_b64decode(value: str | memoryview) -> bytes:
    """Standard, padded, one-line base64 only (else binascii.Error): pybase64 when it is installed
    (SIMD, several times faster than binascii, which was a large share of a worker's CPU per image:
    bench/README.md, P1b), else binascii."""
    if _pybase64 is not None:
        return _pybase64.b64decode(value, validate=True)
    return binascii.a2b_base64(value, strict_mode=True)


def _b64decode(value: str | memoryview) -> bytes:
    """Standard or url-safe base64, padding optional, whitespace ignored.

    The common case (standard, padded, one line: megabytes of it) is decoded in one pass with no copy;
    only text that fails that strict decode is cleaned up and tried again.
    """
    try:
        data = _strict_b64decode(value)
    except (binascii.Error, ValueError):
        text = value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
        cleaned = "".join(text.split()).translate(_URL_SAFE)
        try:
            data = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad(f"Invalid base64 image data ({len(value)} chars): {exc}") from exc
    if not data:
        raise _bad("Empty base64 image data")
    return data


def _inline_image(value: Any, declared_mime: Any) -> ImagePart:
    """An image from base64 text, which may also be a ``data:<mime>;base64,`` URL; a memoryview is a
    long value left in the body (``loads_with_views``)."""
    if isinstance(value, memoryview):
        if bytes(value[:5]) != b"data:":
            return ImagePart(data=_b64decode(value), url=None, declared_mime=_text(declared_mime))
        value = bytes(value).decode("ascii", "replace")
    if not isinstance(value, str):
        raise _bad(f"Image data is {type(value).__name__}, not a base64 string")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        declared_mime = header[5:].split(";")[0] or declared_mime
    return ImagePart(data=_b64decode(value), url=None, declared_mime=_text(declared_mime))


def _collect_openai(payload: dict[str, Any]) -> _Collected:
    collected = _Collected(usage=payload.get("usage") if isinstance(payload.get("usage"), dict) else None)
    for item in payload["data"]:
        if not isinstance(item, dict):
            raise _bad(f"Unexpected item in data[]: {_clip(repr(item), _SNIPPET_LIMIT)}")
        b64, url = item.get("b64_json"), item.get("url")
        if b64:
            collected.images.append(_inline_image(b64, None))
        elif isinstance(url, str) and url.startswith("data:"):
            collected.images.append(_inline_image(url, None))
        elif isinstance(url, str) and url:
            collected.images.append(ImagePart(data=None, url=url, declared_mime=None))
        else:
            raise _bad(f"An item in data[] has neither b64_json nor url: {_clip(repr(item), _SNIPPET_LIMIT)}")
        revised = item.get("revised_prompt")
        if isinstance(revised, str) and revised.strip():
            collected.texts.append(revised)
    return collected


def _collect_gemini(payload: Any) -> _Collected:
    """One Gemini response, or a JSON array of streamed chunks merged in order."""
    chunks = payload if isinstance(payload, list) else [payload]
    if not chunks or not all(isinstance(c, dict) and c.keys() & _GEMINI_KEYS for c in chunks):
        raise _bad(f"Unexpected JSON in a 2xx body: {_clip(json.dumps(payload), _SNIPPET_LIMIT)}")
    collected = _Collected()
    for chunk in chunks:
        usage = _get(chunk, "usageMetadata", "usage_metadata")
        collected.usage = usage if isinstance(usage, dict) else collected.usage
        collected.model_version = (
            _text(_get(chunk, "modelVersion", "model_version")) or collected.model_version
        )
        feedback = _get(chunk, "promptFeedback", "prompt_feedback")
        if isinstance(feedback, dict) and _get(feedback, "blockReason", "block_reason"):
            collected.block_reason = str(_get(feedback, "blockReason", "block_reason"))
            _add_note(collected, _get(feedback, "blockReasonMessage", "block_reason_message"))
        candidates = chunk.get("candidates") or []
        if not isinstance(candidates, list):
            raise _bad(f"candidates is {type(candidates).__name__}, not a list")
        for candidate in candidates:
            _collect_candidate(candidate, collected)
    return collected


def _collect_candidate(candidate: Any, collected: _Collected) -> None:
    if not isinstance(candidate, dict):
        raise _bad(f"A candidate is {type(candidate).__name__}, not an object")
    collected.finish_reason = (
        _text(_get(candidate, "finishReason", "finish_reason")) or collected.finish_reason
    )
    _add_note(collected, _get(candidate, "finishMessage", "finish_message"))
    content = candidate.get("content") or {}
    parts = (content.get("parts") or []) if isinstance(content, dict) else None
    if not isinstance(parts, list):
        raise _bad("A candidate's content.parts is not a list")
    for part in parts:
        if not isinstance(part, dict):
            raise _bad(f"A part is {type(part).__name__}, not an object")
        if part.get("thought"):
            continue
        inline = _get(part, "inlineData", "inline_data")
        if isinstance(inline, dict):
            collected.images.append(_inline_image(inline.get("data"), _get(inline, "mimeType", "mime_type")))
        elif isinstance(part.get("text"), str) and part["text"].strip():
            collected.texts.append(part["text"])


def _add_note(collected: _Collected, note: Any) -> None:
    if isinstance(note, str) and note.strip() and note not in collected.notes:
        collected.notes.append(note.strip())


def _no_image_error(collected: _Collected) -> ResponseError:
    """content_blocked or no_image, saying why and what the model said."""
    if collected.block_reason:
        blocked, reason = True, f"the prompt was blocked (blockReason={collected.block_reason})"
    elif collected.finish_reason in BLOCKING_FINISH_REASONS:
        blocked, reason = True, f"the image was blocked (finishReason={collected.finish_reason})"
    elif collected.finish_reason:
        blocked, reason = False, f"finishReason={collected.finish_reason}"
    else:
        blocked, reason = False, "no finish reason given"
    message = f"The upstream returned no image: {reason}"
    if collected.notes:
        message += f"; {_clip(' '.join(collected.notes))}"
    if collected.texts:
        message += f"; the model said: {_clip(' '.join(collected.texts))}"
    return ResponseError(
        message,
        code="content_blocked" if blocked else "no_image",
        retryable=False,
        upstream_status=200,
    )
