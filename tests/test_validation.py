"""Tests of services.validation: the seed example, accepted variants and every rejection rule."""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.errors import InvalidRequest
from services.validation import (
    MAX_METADATA_DEPTH,
    MAX_MODEL_LENGTH,
    Limits,
    parse_cancel_after,
    parse_json_body,
    validate_submission,
)

SEED = json.loads(
    (Path(__file__).resolve().parents[2] / "shared/upstream/samples/request-seed-example.json").read_text()
)
PNG_B64 = SEED["contents"][0]["parts"][1]["inline_data"]["data"]
LIMITS = Limits()


def body(**top: Any) -> dict[str, Any]:
    """A deep copy of the seed example with top-level fields set (``None`` deletes one)."""
    result = copy.deepcopy(SEED)
    for key, value in top.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def with_part(part: Any) -> dict[str, Any]:
    """The seed example with one more part in ``contents[0]``, at index 3."""
    result = body()
    result["contents"][0]["parts"].append(part)
    return result


def image(data: str = PNG_B64, mime_type: str = "image/png") -> dict[str, Any]:
    return {"inline_data": {"mime_type": mime_type, "data": data}}


def with_config(change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """The seed example after ``change(generationConfig)``."""
    result = body()
    change(result["generationConfig"])
    return result


def test_seed_example_passes_unchanged() -> None:
    submission = validate_submission(copy.deepcopy(SEED), LIMITS)
    assert submission.upstream_body == SEED
    assert submission.model == SEED["model"]
    assert (submission.metadata, submission.webhook_url, submission.webhook_events) == (None, None, None)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(with_part({"inlineData": {"mimeType": "image/jpeg", "data": PNG_B64}}), id="camel-part"),
        pytest.param(with_part(image(mime_type="image/webp")), id="webp"),
        pytest.param(with_part({"text": "more", "thoughtSignature": "abc"}), id="extra-part-keys"),
        pytest.param(
            body(
                generationConfig=None,
                generation_config={
                    "response_modalities": ["image"],
                    "image_config": {"aspect_ratio": "21:9", "image_size": "4K"},
                },
            ),
            id="snake-config",
        ),
        pytest.param(body(contents=[{"parts": [{"text": "a cat"}]}]), id="no-role"),
        pytest.param(body(contents=[{"role": "user", "parts": [image()]}] * 14), id="14-images"),
    ],
)
def test_accepts(value: dict[str, Any]) -> None:
    assert validate_submission(value, LIMITS).upstream_body == value


def test_passes_through_unknown_fields_and_strips_ours() -> None:
    extra = {"safetySettings": [{"category": "X", "threshold": "Y"}], "systemInstruction": {"parts": []}}
    ours = {
        "metadata": {"user": "u1", "tags": ["a"]},
        "webhook_url": "https://hooks.example.com/imagegen?x=1",
        "webhook_events": ["succeeded", "failed"],
    }
    value = body(**extra, **ours)
    original = copy.deepcopy(value)

    submission = validate_submission(value, LIMITS)

    assert submission.upstream_body == body(**extra)
    assert list(submission.upstream_body) == ["model", "contents", "generationConfig", *extra]
    assert submission.metadata == ours["metadata"]
    assert submission.webhook_url == ours["webhook_url"]
    assert submission.webhook_events == ("succeeded", "failed")
    assert value == original


def test_null_means_absent_for_our_fields() -> None:
    submission = validate_submission(body(), LIMITS)
    value = {**body(), "metadata": None, "webhook_url": None, "webhook_events": None}
    assert validate_submission(value, LIMITS) == submission


def test_allowed_models() -> None:
    limits = Limits(allowed_models=frozenset({SEED["model"]}))
    assert validate_submission(body(), limits).model == SEED["model"]
    with pytest.raises(InvalidRequest) as info:
        validate_submission(body(model="gemini-x"), limits)
    assert (info.value.code, info.value.field) == ("unsupported_model", "model")


def test_limits_are_configurable() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_submission(body(), Limits(max_input_images=1))
    assert (info.value.code, info.value.field) == ("too_many_images", "contents")
    with pytest.raises(InvalidRequest) as info:
        validate_submission(body(), Limits(max_inline_image_bytes=10))
    assert info.value.code == "inline_image_too_large"


def nested(levels: int, innermost: Any = None) -> Any:
    """``levels`` objects inside each other (``{"k": {"k": ...}}``), ``innermost`` in the last one; built
    without recursion, so deeper than Python's recursion limit if asked."""
    value: Any = {} if innermost is None else innermost
    for _ in range(levels - 1):
        value = {"k": value}
    return value


BAD_MODEL_NAMES = {
    "too-long": "g" * 129,
    "leading-space": " gemini-2.5-flash-image",
    "newline": "gemini\n",
    "leading-dash": "-gemini",
    "inner-space": "gemini 2.5",
    "non-ascii": "gémini",
    "nul": "gemini\x00",
    "leading-dot": "../../etc/passwd",
    "markup": "<script>",
}
P3 = "contents[0].parts[3]"
BIG = base64.b64encode(bytes(LIMITS.max_inline_image_bytes + 1)).decode()
MAX = base64.b64encode(bytes(LIMITS.max_inline_image_bytes)).decode()


@pytest.mark.parametrize(
    ("value", "code", "field"),
    [
        pytest.param([SEED], "invalid_body", None, id="not-object"),
        pytest.param(body(model=None), "missing_field", "model", id="no-model"),
        pytest.param(body(model=""), "invalid_field", "model", id="empty-model"),
        pytest.param(body(model=3), "invalid_field", "model", id="model-not-string"),
        *[
            pytest.param(body(model=model), "invalid_field", "model", id=f"model-{name}")
            for name, model in BAD_MODEL_NAMES.items()
        ],
        pytest.param(body(contents=None), "missing_field", "contents", id="no-contents"),
        pytest.param(body(contents=[]), "invalid_field", "contents", id="empty-contents"),
        pytest.param(body(contents={"parts": []}), "invalid_field", "contents", id="contents-object"),
        pytest.param(body(contents=["hi"]), "invalid_field", "contents[0]", id="content-not-object"),
        pytest.param(
            body(contents=[{"role": 1, "parts": [{"text": "x"}]}]),
            "invalid_field",
            "contents[0].role",
            id="role",
        ),
        pytest.param(body(contents=[{"role": "user"}]), "missing_field", "contents[0].parts", id="no-parts"),
        pytest.param(
            body(contents=[{"role": "user", "parts": []}]),
            "invalid_field",
            "contents[0].parts",
            id="empty-parts",
        ),
        pytest.param(with_part("text"), "invalid_field", P3, id="part-not-object"),
        pytest.param(with_part({}), "invalid_field", P3, id="empty-part"),
        pytest.param(with_part({"file_data": {"file_uri": "x"}}), "invalid_field", P3, id="file-data-only"),
        pytest.param(with_part({"text": 5}), "invalid_field", f"{P3}.text", id="text-not-string"),
        pytest.param(with_part({"text": ""}), "invalid_field", f"{P3}.text", id="text-empty"),
        pytest.param(with_part({"text": "x", **image()}), "invalid_field", P3, id="text-and-image"),
        pytest.param(
            with_part({**image(), "inlineData": image()["inline_data"]}),
            "invalid_field",
            f"{P3}.inlineData",
            id="both-spellings",
        ),
        pytest.param(
            with_part({"inline_data": "x"}), "invalid_field", f"{P3}.inline_data", id="inline-not-object"
        ),
        pytest.param(
            with_part({"inline_data": {"data": PNG_B64}}),
            "missing_field",
            f"{P3}.inline_data.mime_type",
            id="no-mime-type",
        ),
        pytest.param(
            with_part({"inlineData": {"mimeType": "image/gif", "data": PNG_B64}}),
            "unsupported_mime_type",
            f"{P3}.inlineData.mimeType",
            id="gif",
        ),
        pytest.param(
            with_part({"inline_data": {"mime_type": "image/png"}}),
            "missing_field",
            f"{P3}.inline_data.data",
            id="no-data",
        ),
        pytest.param(
            with_part(image(data=7)), "invalid_field", f"{P3}.inline_data.data", id="data-not-string"
        ),
        pytest.param(with_part(image(data="")), "invalid_base64", f"{P3}.inline_data.data", id="data-empty"),
        pytest.param(
            with_part(image(data=PNG_B64.rstrip("="))),
            "invalid_base64",
            f"{P3}.inline_data.data",
            id="no-padding",
        ),
        pytest.param(
            with_part(image(data=PNG_B64[:40] + "\n" + PNG_B64[40:])),
            "invalid_base64",
            f"{P3}.inline_data.data",
            id="newline",
        ),
        pytest.param(
            with_part(image(data="data:image/png;base64," + PNG_B64)),
            "invalid_base64",
            f"{P3}.inline_data.data",
            id="data-url",
        ),
        pytest.param(with_part(image(data="ab-_")), "invalid_base64", f"{P3}.inline_data.data", id="urlsafe"),
        pytest.param(
            with_part(image(data="aé==")), "invalid_base64", f"{P3}.inline_data.data", id="non-ascii"
        ),
        pytest.param(
            with_part(image(data=BIG)), "inline_image_too_large", f"{P3}.inline_data.data", id="too-large"
        ),
        pytest.param(
            body(contents=[{"role": "user", "parts": [image()]}] * 15), "too_many_images", "contents", id="15"
        ),
        pytest.param(
            body(generationConfig=None), "missing_field", "generationConfig", id="no-generation-config"
        ),
        pytest.param(body(generationConfig=[]), "invalid_field", "generationConfig", id="config-not-object"),
        pytest.param(
            body(generation_config={}),
            "invalid_field",
            "generation_config",
            id="config-both-spellings",
        ),
        pytest.param(
            with_config(lambda c: c.pop("responseModalities")),
            "missing_field",
            "generationConfig.responseModalities",
            id="no-modalities",
        ),
        pytest.param(
            with_config(lambda c: c.update(responseModalities=[])),
            "invalid_field",
            "generationConfig.responseModalities",
            id="empty-modalities",
        ),
        pytest.param(
            with_config(lambda c: c.update(responseModalities=["IMAGE", "AUDIO"])),
            "invalid_field",
            "generationConfig.responseModalities[1]",
            id="audio",
        ),
        pytest.param(
            with_config(lambda c: c.update(responseModalities=["TEXT"])),
            "invalid_field",
            "generationConfig.responseModalities",
            id="text-only",
        ),
        pytest.param(
            with_config(lambda c: c.pop("imageConfig")),
            "missing_field",
            "generationConfig.imageConfig",
            id="no-image-config",
        ),
        pytest.param(
            with_config(lambda c: c.update(imageConfig="1:1")),
            "invalid_field",
            "generationConfig.imageConfig",
            id="image-config-not-object",
        ),
        pytest.param(
            with_config(lambda c: c["imageConfig"].pop("aspectRatio")),
            "missing_field",
            "generationConfig.imageConfig.aspectRatio",
            id="no-ratio",
        ),
        pytest.param(
            with_config(lambda c: c["imageConfig"].update(aspectRatio="2:1")),
            "invalid_field",
            "generationConfig.imageConfig.aspectRatio",
            id="bad-ratio",
        ),
        pytest.param(
            with_config(lambda c: c["imageConfig"].pop("imageSize")),
            "missing_field",
            "generationConfig.imageConfig.imageSize",
            id="no-size",
        ),
        pytest.param(
            with_config(lambda c: c["imageConfig"].update(imageSize="1k")),
            "invalid_field",
            "generationConfig.imageConfig.imageSize",
            id="lowercase-size",
        ),
        pytest.param(body(metadata=["a"]), "invalid_field", "metadata", id="metadata-not-object"),
        pytest.param(body(metadata={"k": float("nan")}), "invalid_field", "metadata", id="metadata-nan"),
        pytest.param(body(metadata={"k": "x" * 4090}), "metadata_too_large", "metadata", id="metadata-large"),
        pytest.param(
            body(metadata={"x" * 4092: 1}), "metadata_too_large", "metadata", id="metadata-large-key"
        ),
        pytest.param(body(metadata=nested(6)), "invalid_field", "metadata", id="metadata-deep"),
        pytest.param(
            body(metadata={"a": nested(5, [])}), "invalid_field", "metadata", id="metadata-deep-array"
        ),
        pytest.param(
            body(metadata={"k": "\ud800"}), "invalid_field", "metadata", id="metadata-lone-surrogate"
        ),
        pytest.param(body(metadata={"\udfff": 1}), "invalid_field", "metadata", id="metadata-surrogate-key"),
        pytest.param(body(webhook_url=42), "invalid_field", "webhook_url", id="url-not-string"),
        pytest.param(body(webhook_url="/hooks"), "invalid_field", "webhook_url", id="url-relative"),
        pytest.param(body(webhook_url="ftp://h/x"), "invalid_field", "webhook_url", id="url-ftp"),
        pytest.param(body(webhook_url="https:///x"), "invalid_field", "webhook_url", id="url-no-host"),
        pytest.param(body(webhook_url="https://h:99999/"), "invalid_field", "webhook_url", id="url-bad-port"),
        pytest.param(body(webhook_url="https://[::1/"), "invalid_field", "webhook_url", id="url-bad-ipv6"),
        pytest.param(body(webhook_url="https://h/a b"), "invalid_field", "webhook_url", id="url-space"),
        pytest.param(
            body(webhook_url="https://h/" + "a" * 2039), "invalid_field", "webhook_url", id="url-too-long"
        ),
        pytest.param(body(webhook_events=["failed"]), "invalid_field", "webhook_events", id="events-no-url"),
        pytest.param(
            body(webhook_url="https://h/", webhook_events=[]),
            "invalid_field",
            "webhook_events",
            id="events-empty",
        ),
        pytest.param(
            body(webhook_url="https://h/", webhook_events="failed"),
            "invalid_field",
            "webhook_events",
            id="events-string",
        ),
        pytest.param(
            body(webhook_url="https://h/", webhook_events=["failed", "cancelled"]),
            "invalid_field",
            "webhook_events[1]",
            id="events-unknown",
        ),
        pytest.param(
            body(webhook_url="https://h/", webhook_events=["failed", "failed"]),
            "invalid_field",
            "webhook_events",
            id="events-duplicate",
        ),
    ],
)
def test_rejects(value: Any, code: str, field: str | None) -> None:
    original = copy.deepcopy(value)
    with pytest.raises(InvalidRequest) as info:
        validate_submission(value, LIMITS)
    assert (info.value.code, info.value.field) == (code, field)
    assert info.value.status == 400 and info.value.message
    assert value == original


def test_boundaries_are_inclusive() -> None:
    value = body(
        contents=[{"role": "user", "parts": [image(data=MAX)]}],
        metadata={"k": "x" * 4088},
        webhook_url="https://h/" + "a" * 2038,
        model="m" * MAX_MODEL_LENGTH,
    )
    assert len(json.dumps(value["metadata"], separators=(",", ":"))) == LIMITS.max_metadata_bytes
    assert len(value["webhook_url"]) == 2048
    assert validate_submission(value, LIMITS).upstream_body["contents"] == value["contents"]
    assert validate_submission(body(metadata=nested(MAX_METADATA_DEPTH, [1])), LIMITS).metadata


def test_metadata_deeper_than_python_recurses_is_refused() -> None:
    """json.dumps (the size check) would raise RecursionError: the depth is checked first, iteratively."""
    with pytest.raises(InvalidRequest) as info:
        validate_submission(body(metadata=nested(5000)), LIMITS)
    assert (info.value.code, info.value.field) == ("invalid_field", "metadata")


@pytest.mark.parametrize(
    "model",
    [
        "gemini-2.5-flash-image-preview",
        "gemini-2.5-flash-image",
        "models/gemini-3-pro-image-preview",
        "google/gemini-2.5-flash-image",
        "publishers/google/models/imagen-4.0-generate-001",
        "imagen-4.0@001",
        "tunedModels/my_model:v2",
    ],
)
def test_model_names_as_they_are_spelled(model: str) -> None:
    assert validate_submission(body(model=model), LIMITS).model == model


# parse_json_body ----------------------------------------------------------------------------------------


def deep(levels: int, opening: bytes = b"[", closing: bytes = b"]") -> bytes:
    return opening * levels + closing * levels


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(b"{not json", None, id="not-json"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b"\xff\xfe\x00", None, id="not-utf-8"),
        pytest.param('{"model": "gémini"}'.encode("latin-1"), None, id="latin-1"),
        pytest.param(b'{"a": NaN}', None, id="nan"),
        pytest.param(b'{"a": [Infinity]}', None, id="infinity"),
        pytest.param(b'{"a": -Infinity}', None, id="minus-infinity"),
        pytest.param(deep(100_000), None, id="deeper-than-python-arrays"),
        pytest.param(deep(100_000, b'{"a":', b"}"), None, id="deeper-than-python-objects"),
        pytest.param(b'{"contents": ' + deep(64) + b"}", "contents", id="too-deep-in-contents"),
        pytest.param(b'{"metadata": ' + deep(900) + b"}", "metadata", id="very-deep-in-metadata"),
        pytest.param(b'{"model": "m", "x": [1, {"y": ' + deep(70) + b"}]}", "x", id="too-deep-further-in"),
        pytest.param(deep(65), None, id="too-deep-array-body"),
        pytest.param(b'{"metadata": {"k": "\\ud800"}}', "metadata", id="lone-high-surrogate"),
        pytest.param(
            b'{"contents": [{"parts": [{"text": "a\\udc00b"}]}]}', "contents", id="lone-low-surrogate"
        ),
        pytest.param(b'{"\\ud800": 1}', None, id="lone-surrogate-as-key"),
        pytest.param(b'"\\ude00\\ud83d"', None, id="surrogates-in-the-wrong-order"),
    ],
)
def test_parse_refuses(raw: bytes, field: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_json_body(raw)
    assert (info.value.code, info.value.field, info.value.status) == ("invalid_json", field, 400)
    assert info.value.message


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(json.dumps(SEED).encode(), id="seed"),
        pytest.param(b'{"a": ' + deep(63) + b"}", id="64-levels"),
        pytest.param(b'{"t": "\\ud83d\\ude00 \xf0\x9f\x98\x80"}', id="surrogate-pair-and-utf-8"),
        pytest.param(b'{"t": "\\\\ud800"}', id="escaped-backslash-then-u"),
        pytest.param(b'{"n": [1e308, -0.0, 12345678901234567890]}', id="numbers"),
        pytest.param(b" [] ", id="empty-array"),
    ],
)
def test_parse_accepts(raw: bytes) -> None:
    assert parse_json_body(raw) == json.loads(raw)


def test_parse_reads_big_flat_bodies_fast() -> None:
    """The depth walk skips an array with nothing to walk into at C speed: 2 M numbers."""
    raw = b"[" + b"0," * 2_000_000 + b"0]"
    started = time.monotonic()
    assert len(parse_json_body(raw)) == 2_000_001
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("value", "seconds"), [("1500ms", 1.5), ("1.5s", 1.5), ("2.25m", 135), ("168h", 604800)]
)
def test_cancel_after_accepts(value: str, seconds: float) -> None:
    assert parse_cancel_after(value) == seconds


@pytest.mark.parametrize("value", ["7d", "168.001h", "1.5555s", "0ms", "30"])
def test_cancel_after_refuses_naming_the_units_and_the_maximum(value: str) -> None:
    """The message lists exactly what is accepted: "7 days" alone would invite 7d, which is no unit."""
    with pytest.raises(InvalidRequest) as refused:
        parse_cancel_after(value)
    assert refused.value.field == "Cancel-After"
    assert "units ms, s, m, h" in refused.value.message and "at most 168h" in refused.value.message
