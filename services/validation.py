"""Validation of a client's submission to ``POST /v1/images/generations`` (and of a batch of them).

``parse_json_body`` turns the raw body into JSON, strictly and to a bounded depth. ``validate_submission``
is a pure function over the parsed JSON body: it checks what the upstream requires
(see ``shared/upstream/README.md``), splits off our own top-level fields (``metadata``, ``webhook_url``,
``webhook_events``) and returns the rest, unchanged, as the body to forward. Every rejection is an
``InvalidRequest`` whose ``field`` is the JSON path of the offending value (``contents[0].parts[1]...``).
Both spellings the Gemini REST API accepts (camelCase and snake_case) are accepted; paths in errors use
the spelling the client sent. Our fields may be null, meaning absent. Cheap checks run first; each inline
image is base64-decoded once. Everything of a submission that the task record keeps is bounded: ``model``
(length and characters), ``metadata`` (size and depth), ``webhook_url`` (length), ``webhook_events``.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from services.errors import InvalidRequest

ASPECT_RATIOS: tuple[str, ...] = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGE_SIZES: tuple[str, ...] = ("1K", "2K", "4K")
INPUT_MIME_TYPES: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
RESPONSE_MODALITIES: tuple[str, ...] = ("TEXT", "IMAGE")
WEBHOOK_EVENTS: tuple[str, ...] = ("running", "succeeded", "failed", "canceled")
MAX_WEBHOOK_URL_LENGTH = 2048
MAX_MODEL_LENGTH = 128
# Model names as the Gemini API and gateways spell them: gemini-2.5-flash-image-preview,
# models/gemini-3-pro-image-preview, google/gemini-2.5-flash-image, imagen-4.0@001.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]*")
# Containers inside containers: a Gemini request nests about 6 deep (contents[].parts[].inline_data.data),
# a JSON schema in generationConfig or tools some more. Deeper is refused before anything recurses into it
# (json.dumps, Redis's cjson, the upstream).
MAX_JSON_DEPTH = 64
MAX_METADATA_DEPTH = 5

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")

MAX_BATCH_REQUESTS = 1000
BATCH_EVENTS: tuple[str, ...] = ("batch.completed", *(f"task.{event}" for event in WEBHOOK_EVENTS))
DEFAULT_BATCH_EVENTS: tuple[str, ...] = ("batch.completed",)
_BATCH_FIELDS = frozenset({"requests", "metadata", "webhook_url", "webhook_events"})

_OUR_FIELDS = frozenset({"metadata", "webhook_url", "webhook_events", "priority"})


@dataclass(frozen=True)
class Submission:
    """A valid submission: the body to forward upstream (a shallow copy) and our own fields."""

    upstream_body: dict[str, Any]
    model: str
    metadata: dict[str, Any] | None
    webhook_url: str | None
    webhook_events: tuple[str, ...] | None
    priority: str = "normal"


@dataclass(frozen=True)
class BatchSubmission:
    """A valid batch: its requests, each a valid submission, and its own fields. ``webhook_events``
    are ``BATCH_EVENTS``: ``batch.completed`` goes to the batch's ``webhook_url``, and each ``task.*``
    event is sent there for every task of the batch whose request has no ``webhook_url`` of its own."""

    submissions: list[Submission]
    metadata: dict[str, Any] | None
    webhook_url: str | None
    webhook_events: tuple[str, ...]


@dataclass(frozen=True)
class Limits:
    """Configurable limits; ``allowed_models=None`` accepts any model name."""

    max_input_images: int = 14
    max_inline_image_bytes: int = 7 * 1024 * 1024
    max_metadata_bytes: int = 4096
    allowed_models: frozenset[str] | None = None


MAX_CANCEL_AFTER_SECONDS = 7 * 86400
_DURATION = re.compile(r"(\d{1,9}(?:\.\d{1,3})?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Every accepted unit and the maximum in hours, the largest unit: "7d" is no duration here.
_CANCEL_AFTER_REFUSED = (
    f"Cancel-After must be a number (up to 3 decimals) and one of the units {', '.join(_UNIT_SECONDS)}, "
    f"e.g. 1500ms, 30s, 1.5m or 2h; more than 0 and at most {MAX_CANCEL_AFTER_SECONDS // 3600}h (7 days)"
)


def parse_cancel_after(value: str | None) -> float | None:
    """The ``Cancel-After`` header (``30s``, ``5m``, ``2h``, ``1500ms``; like Replicate's) in seconds."""
    if value is None:
        return None
    match = _DURATION.fullmatch(value.strip())
    seconds = float(match[1]) * _UNIT_SECONDS[match[2]] if match else 0.0
    if not 0 < seconds <= MAX_CANCEL_AFTER_SECONDS:
        raise InvalidRequest(_CANCEL_AFTER_REFUSED, field="Cancel-After")
    return seconds


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON, or ``InvalidRequest`` ``invalid_json``: not JSON, not UTF-8 text, NaN or
    Infinity (not JSON either, though Python's parser takes them), a string with a lone surrogate escape
    (``"\\ud800"``: not text, and unencodable to UTF-8), or nesting deeper than ``MAX_JSON_DEPTH``
    (``field``: the top-level key it is under)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # deeper than Python's recursion limit, far deeper than we allow
        raise _invalid_json(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid_json(f"the body is not valid JSON: {exc}") from None
    # UTF-8 text cannot hold a surrogate: only an escape can make one, and most bodies have none
    strings = _SURROGATE_ESCAPE.search(raw) is not None
    for value, level, top in _walk(body, strings=strings):
        field = top if isinstance(top, str) and len(top) <= 64 and top.isprintable() else None
        if not isinstance(value, str) and level > MAX_JSON_DEPTH:
            raise _invalid_json(f"the body nests deeper than {MAX_JSON_DEPTH} levels", field)
        if isinstance(value, str) and not _is_text(value):
            raise _invalid_json("a string holds a lone surrogate escape (\\ud800-\\udfff): not text", field)
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _invalid_json(message: str, field: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_json", field=field)


def _is_text(value: str) -> bool:
    """Whether ``value`` can be written as UTF-8 (has no lone surrogate)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _walk(root: Any, *, strings: bool = False) -> Iterator[tuple[Any, int, str | int | None]]:
    """Every object and array in ``root`` (``root`` included), and with ``strings`` every string (keys
    too), with its level (``root`` is 1, what a level-n container holds is n + 1) and the top-level key
    or index it is under. Depth first, without recursion (any depth ``json.loads`` produced can be
    measured), in memory of the order of the depth, not of the size."""
    yield root, 1, None
    wanted = (dict, list, str) if strings else (dict, list)
    pending: list[tuple[Iterator[tuple[str | int, Any]], int, str | int | None]] = [
        (_items(root, wanted), 2, None)
    ]
    while pending:
        items, level, top = pending[-1]
        for key, value in items:
            under = key if level == 2 else top
            if strings and isinstance(key, str):
                yield key, level, under
            if isinstance(value, dict | list):
                yield value, level, under
                if value:
                    pending.append((_items(value, wanted), level + 1, under))
                    break  # its parent's iterator goes on where it stopped once this one is done
            elif strings and isinstance(value, str):
                yield value, level, under
        else:
            pending.pop()


def _items(value: Any, wanted: tuple[type, ...]) -> Iterator[tuple[str | int, Any]]:
    if isinstance(value, dict):
        return iter(value.items())
    # An array of nothing wanted (numbers, say: up to MAX_BODY_BYTES / 2 of them) is skipped at C speed.
    if isinstance(value, list) and not set(map(type, value)).isdisjoint(wanted):
        return enumerate(value)
    return iter(())


def validate_submission(body: Any, limits: Limits) -> Submission:
    """Check ``body`` and split it into the upstream body and our fields; raise ``InvalidRequest``."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_body")
    model = _check_model(body, limits)
    _check_generation_config(body)
    metadata = _check_metadata(body.get("metadata"), limits)
    webhook_url = _check_webhook_url(body.get("webhook_url"))
    webhook_events = _check_webhook_events(body.get("webhook_events"), webhook_url)
    priority = body.get("priority") or "normal"
    if priority not in PRIORITIES:
        raise _invalid("priority", f"priority must be one of {', '.join(PRIORITIES)}.")
    _check_contents(body, limits)
    return Submission(
        upstream_body={key: value for key, value in body.items() if key not in _OUR_FIELDS},
        model=model,
        metadata=metadata,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        priority=priority,
    )


def validate_batch(body: Any, limits: Limits) -> BatchSubmission:
    """Check a batch (``POST /v1/batches``): every request as ``validate_submission`` does, an error's
    ``field`` naming its request (``requests[3].contents``), and the batch's own fields."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_body")
    unknown = sorted(set(body) - _BATCH_FIELDS)
    if unknown:
        raise _invalid(
            unknown[0], f"Unknown field {_show(unknown[0])}; a batch has {', '.join(sorted(_BATCH_FIELDS))}."
        )
    requests = body.get("requests")
    if not isinstance(requests, list) or not 1 <= len(requests) <= MAX_BATCH_REQUESTS:
        raise _invalid(
            "requests",
            f"requests must be an array of 1 to {MAX_BATCH_REQUESTS} request bodies"
            + (f", not {len(requests)}." if isinstance(requests, list) else "."),
            code="missing_field" if requests is None else "invalid_field",
        )
    metadata = _check_metadata(body.get("metadata"), limits)
    webhook_url = _check_webhook_url(body.get("webhook_url"))
    webhook_events = _check_webhook_events(body.get("webhook_events"), webhook_url, BATCH_EVENTS)
    submissions = []
    for index, request in enumerate(requests):
        with in_batch_request(index):
            submissions.append(validate_submission(request, limits))
    return BatchSubmission(
        submissions=submissions,
        metadata=metadata,
        webhook_url=webhook_url,
        webhook_events=webhook_events or (DEFAULT_BATCH_EVENTS if webhook_url else ()),
    )


@contextmanager
def in_batch_request(index: int) -> Iterator[None]:
    """An ``InvalidRequest`` raised inside names the batch's request ``index``: ``requests[3].model``."""
    try:
        yield
    except InvalidRequest as exc:
        exc.field = f"requests[{index}]" + (f".{exc.field}" if exc.field else "")
        exc.message = f"requests[{index}]: {exc.message}"
        exc.args = (exc.message,)
        raise


def _invalid(field: str, message: str, code: str = "invalid_field") -> InvalidRequest:
    return InvalidRequest(message, code=code, field=field)


def _show(value: Any) -> str:
    """A short repr of a client's value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _pick(obj: dict[str, Any], path: str, *names: str, required: bool = True) -> tuple[str, Any]:
    """Return ``(path, value)`` of the one spelling of a field present in ``obj``.

    ``names`` are the accepted spellings, preferred first; a missing required field is reported under the
    preferred one, a field given in two spellings is ambiguous.
    """
    present = [name for name in names if name in obj]
    if len(present) > 1:
        raise _invalid(_join(path, present[1]), f"Give only one of {' or '.join(present)}.")
    if not present:
        if required:
            raise _invalid(_join(path, names[0]), f"{names[0]} is required.", "missing_field")
        return _join(path, names[0]), None
    return _join(path, present[0]), obj[present[0]]


def _check_model(body: dict[str, Any], limits: Limits) -> str:
    if "model" not in body:
        raise _invalid("model", "model is required: the name of a Gemini image model.", "missing_field")
    model = body["model"]
    if not isinstance(model, str) or not model.strip():
        raise _invalid("model", "model must be a non-empty string.")
    if len(model) > MAX_MODEL_LENGTH or not MODEL_NAME.fullmatch(model):
        raise _invalid(
            "model",
            f"model must be a model name of at most {MAX_MODEL_LENGTH} characters: letters, digits and "
            ". _ - / : @, starting with a letter or digit (e.g. 'gemini-2.5-flash-image-preview').",
        )
    if limits.allowed_models is not None and model not in limits.allowed_models:
        allowed = ", ".join(sorted(limits.allowed_models))
        raise _invalid(
            "model", f"Model {_show(model)} is not supported; use one of: {allowed}.", "unsupported_model"
        )
    return model


def _check_generation_config(body: dict[str, Any]) -> None:
    path, config = _pick(body, "", "generationConfig", "generation_config")
    if not isinstance(config, dict):
        raise _invalid(path, f"{path} must be an object with responseModalities and imageConfig.")

    modalities_path, modalities = _pick(config, path, "responseModalities", "response_modalities")
    if not isinstance(modalities, list) or not modalities:
        raise _invalid(
            modalities_path, f"{modalities_path} must be a non-empty array, e.g. ['TEXT', 'IMAGE']."
        )
    for index, modality in enumerate(modalities):
        if not isinstance(modality, str) or modality.upper() not in RESPONSE_MODALITIES:
            raise _invalid(f"{modalities_path}[{index}]", "Each response modality must be TEXT or IMAGE.")
    if not any(modality.upper() == "IMAGE" for modality in modalities):
        raise _invalid(modalities_path, f"{modalities_path} must include IMAGE: this API generates images.")

    image_path, image_config = _pick(config, path, "imageConfig", "image_config")
    if not isinstance(image_config, dict):
        raise _invalid(image_path, f"{image_path} must be an object with aspectRatio and imageSize.")
    ratio_path, ratio = _pick(image_config, image_path, "aspectRatio", "aspect_ratio")
    if ratio not in ASPECT_RATIOS:
        raise _invalid(
            ratio_path, f"Unsupported aspect ratio {_show(ratio)}; use one of: {', '.join(ASPECT_RATIOS)}."
        )
    size_path, size = _pick(image_config, image_path, "imageSize", "image_size")
    if size not in IMAGE_SIZES:
        raise _invalid(
            size_path, f"Unsupported image size {_show(size)}; use one of: {', '.join(IMAGE_SIZES)}."
        )


def _check_contents(body: dict[str, Any], limits: Limits) -> None:
    contents = body.get("contents")
    if contents is None:
        raise _invalid(
            "contents", "contents is required: a non-empty array of {role, parts}.", "missing_field"
        )
    if not isinstance(contents, list) or not contents:
        raise _invalid("contents", "contents must be a non-empty array of {role, parts} objects.")
    images = 0
    for content_index, content in enumerate(contents):
        path = f"contents[{content_index}]"
        if not isinstance(content, dict):
            raise _invalid(path, f"{path} must be an object with role and parts.")
        if not isinstance(content.get("role", ""), str):
            raise _invalid(f"{path}.role", "role must be a string, e.g. 'user'.")
        parts = content.get("parts")
        if parts is None:
            raise _invalid(f"{path}.parts", "parts is required: a non-empty array.", "missing_field")
        if not isinstance(parts, list) or not parts:
            raise _invalid(f"{path}.parts", "parts must be a non-empty array of {text} or {inline_data}.")
        for part_index, part in enumerate(parts):
            if _check_part(part, f"{path}.parts[{part_index}]", limits):
                images += 1
                if images > limits.max_input_images:
                    raise _invalid(
                        "contents",
                        f"Too many input images: at most {limits.max_input_images} per request.",
                        "too_many_images",
                    )


def _check_part(part: Any, path: str, limits: Limits) -> bool:
    """Validate one part; return whether it carries an inline image."""
    if not isinstance(part, dict):
        raise _invalid(path, f"{path} must be an object: {{text}} or {{inline_data: {{mime_type, data}}}}.")
    data_path, inline = _pick(part, path, "inline_data", "inlineData", required=False)
    if "text" in part and inline is not None:
        raise _invalid(path, "A part holds either text or inline_data, not both.")
    if "text" in part:
        if not isinstance(part["text"], str) or not part["text"]:
            raise _invalid(f"{path}.text", "text must be a non-empty string.")
        return False
    if inline is None:
        raise _invalid(path, "A part must have text or inline_data (an image as {mime_type, data}).")
    if not isinstance(inline, dict):
        raise _invalid(data_path, f"{data_path} must be an object with mime_type and data.")
    _check_mime_type(*_pick(inline, data_path, "mime_type", "mimeType"))
    _check_image_data(*_pick(inline, data_path, "data"), limits)
    return True


def _check_mime_type(path: str, mime_type: Any) -> None:
    if mime_type not in INPUT_MIME_TYPES:
        raise _invalid(
            path,
            f"Unsupported image type {_show(mime_type)}; use one of: {', '.join(INPUT_MIME_TYPES)}.",
            "unsupported_mime_type",
        )


def _check_image_data(path: str, data: Any, limits: Limits) -> None:
    """Check that ``data`` is padded standard base64 of at most ``max_inline_image_bytes`` bytes."""
    if not isinstance(data, str):
        raise _invalid(path, "data must be a string: the image as standard base64.")
    padding = 2 if data.endswith("==") else 1 if data.endswith("=") else 0
    size = len(data) // 4 * 3 - padding  # exact for valid base64, a cheap bound before decoding
    if size > limits.max_inline_image_bytes:
        raise _invalid(
            path,
            f"Inline image is {size} bytes; at most {limits.max_inline_image_bytes} bytes are allowed.",
            "inline_image_too_large",
        )
    try:
        valid = bool(binascii.a2b_base64(data, strict_mode=True))
    except ValueError:
        valid = False
    if not valid:
        raise _invalid(
            path,
            "data must be non-empty standard base64 (A-Z, a-z, 0-9, +, / with = padding), "
            "without whitespace or a data: URL prefix.",
            "invalid_base64",
        )


def _check_metadata(metadata: Any, limits: Limits) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise _invalid("metadata", "metadata must be a JSON object.")
    # depth first: json.dumps below recurses
    if any(
        level > MAX_METADATA_DEPTH and isinstance(value, dict | list) for value, level, _ in _walk(metadata)
    ):
        raise _invalid(
            "metadata",
            f"metadata must not nest objects or arrays more than {MAX_METADATA_DEPTH} levels deep.",
        )
    try:
        encoded = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(encoded.encode())
    except ValueError as exc:  # UnicodeEncodeError is one
        raise _invalid(
            "metadata", "metadata must be plain JSON (no NaN or Infinity, no lone surrogate)."
        ) from exc
    if size > limits.max_metadata_bytes:
        raise _invalid(
            "metadata",
            f"metadata is {size} bytes as compact JSON; at most {limits.max_metadata_bytes} are allowed.",
            "metadata_too_large",
        )
    return metadata


def _check_webhook_url(url: Any) -> str | None:
    if url is None:
        return None
    message = (
        f"webhook_url must be an absolute http(s) URL with a host, at most {MAX_WEBHOOK_URL_LENGTH} chars."
    )
    if not isinstance(url, str) or len(url) > MAX_WEBHOOK_URL_LENGTH or not url.isprintable() or " " in url:
        raise _invalid("webhook_url", message)
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise _invalid("webhook_url", message)
    return url


def _check_webhook_events(
    events: Any, webhook_url: str | None, choices: tuple[str, ...] = WEBHOOK_EVENTS
) -> tuple[str, ...] | None:
    if events is None:
        return None
    if webhook_url is None:
        raise _invalid("webhook_events", "webhook_events needs webhook_url.")
    allowed = ", ".join(choices)
    if not isinstance(events, list) or not events:
        raise _invalid("webhook_events", f"webhook_events must be a non-empty array of: {allowed}.")
    for index, event in enumerate(events):
        if event not in choices:
            raise _invalid(
                f"webhook_events[{index}]", f"Unknown webhook event {_show(event)}; use: {allowed}."
            )
    if len(set(events)) != len(events):
        raise _invalid("webhook_events", "webhook_events must not repeat an event.")
    return tuple(events)
