"""services.upstream_response: every upstream sample, the error table, base64 and Retry-After forms."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.errors import ResponseError, UpstreamError
from services.images import inspect_image
from services.upstream_response import (
    BLOCKING_FINISH_REASONS,
    ImagePart,
    UpstreamResult,
    classify_error,
    parse_success,
    retry_delay_seconds,
)

SHARED = Path(os.environ.get("IMAGEGEN_SHARED_DIR", Path(__file__).parents[2] / "shared"))
SAMPLES = SHARED / "upstream" / "samples"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def doc(name: str) -> Any:
    return json.loads(sample(name))


def parts(name: str) -> list[dict]:
    return doc(name)["candidates"][0]["content"]["parts"]


def gemini(*parts: dict, finish: str | None = "STOP", **extra: Any) -> bytes:
    """A camelCase Gemini body with one candidate."""
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}}
    if finish:
        candidate["finishReason"] = finish
    return json.dumps({"candidates": [candidate], **extra}).encode()


PNG = base64.b64decode(parts("response-gemini-camel.json")[1]["inlineData"]["data"])
PNG_B64 = base64.b64encode(PNG).decode()


# ---------------------------------------------------------------- success samples

# file -> (image base64 strings as found in the sample, texts, usage, finish reason, model version)
SUCCESS = {
    "response-gemini-camel.json": lambda: (
        [parts("response-gemini-camel.json")[1]["inlineData"]["data"]],
        ["Here is your llama."],
        doc("response-gemini-camel.json")["usageMetadata"],
        "STOP",
        "gemini-2.5-flash-image",
    ),
    "response-gemini-snake.json": lambda: (
        [parts("response-gemini-snake.json")[0]["inline_data"]["data"]],
        [],
        doc("response-gemini-snake.json")["usage_metadata"],
        "STOP",
        None,
    ),
    "response-thought-then-final.json": lambda: (
        [parts("response-thought-then-final.json")[2]["inlineData"]["data"]],
        [],
        None,
        "STOP",
        None,
    ),
    "response-two-images.json": lambda: (
        [
            parts("response-two-images.json")[0]["inlineData"]["data"],
            parts("response-two-images.json")[2]["inlineData"]["data"],
        ],
        ["And a second take."],
        None,
        "STOP",
        None,
    ),
    "response-openai-style.json": lambda: (
        [doc("response-openai-style.json")["data"][0]["b64_json"]],
        [],
        None,
        None,
        None,
    ),
}

# file -> (code, substrings of the message)
NO_IMAGE = {
    "response-no-image-safety.json": ("content_blocked", ["IMAGE_SAFETY"]),
    "response-prompt-blocked.json": ("content_blocked", ["PROHIBITED_CONTENT", "prompt"]),
    "response-text-only.json": ("no_image", ["STOP", "I can't create that image"]),
}

# file -> (HTTP status, code, retryable, retry_after, message)
ERRORS = {
    "error-400-invalid.json": (400, "upstream_rejected", False, None, "Unsupported aspect ratio: 7:3"),
    "error-429-daily-quota.json": (
        429,
        "upstream_quota_exhausted",
        False,
        None,
        "Upstream 429 RESOURCE_EXHAUSTED: You exceeded your current quota.",
    ),
    "error-429-quota.json": (
        429,
        "upstream_rate_limited",
        True,
        29.72,
        "Upstream 429 RESOURCE_EXHAUSTED: Resource has been exhausted (e.g. check quota).",
    ),
    "error-500-list-wrapped.json": (
        500,
        "upstream_unavailable",
        True,
        None,
        "Upstream 500 INTERNAL: An internal error has occurred.",
    ),
    "error-503.json": (
        503,
        "upstream_unavailable",
        True,
        None,
        "Upstream 503 UNAVAILABLE: The model is overloaded. Please try again later.",
    ),
}


def test_every_sample_is_covered() -> None:
    names = {p.name for p in SAMPLES.glob("*.json")} - {"request-seed-example.json"}
    assert names == set(SUCCESS) | set(NO_IMAGE) | set(ERRORS)


@pytest.mark.parametrize("name", sorted(SUCCESS))
def test_success_samples(name: str) -> None:
    images_b64, texts, usage, finish, model_version = SUCCESS[name]()
    result = parse_success(sample(name))
    assert [image.data for image in result.images] == [base64.b64decode(b) for b in images_b64]
    assert [image.url for image in result.images] == [None] * len(images_b64)
    assert (result.texts, result.usage, result.finish_reason, result.model_version) == (
        texts,
        usage,
        finish,
        model_version,
    )
    for image in result.images:
        info = inspect_image(image.data or b"")
        assert (info.mime_type, info.width, info.height) == ("image/png", 16, 16)


def test_declared_mime_is_kept() -> None:
    assert parse_success(sample("response-gemini-camel.json")).images[0].declared_mime == "image/png"
    assert parse_success(sample("response-gemini-snake.json")).images[0].declared_mime == "image/png"
    assert parse_success(sample("response-openai-style.json")).images[0].declared_mime is None


def test_thought_image_is_not_the_final_one() -> None:
    thought, final = parts("response-thought-then-final.json")[1:]
    assert thought["thought"] is True and thought["inlineData"]["data"] != final["inlineData"]["data"]
    (image,) = parse_success(sample("response-thought-then-final.json")).images
    assert image.data == base64.b64decode(final["inlineData"]["data"])


@pytest.mark.parametrize("name", sorted(NO_IMAGE))
def test_no_image_samples(name: str) -> None:
    code, fragments = NO_IMAGE[name]
    with pytest.raises(ResponseError) as caught:
        parse_success(sample(name))
    error = caught.value
    assert (error.code, error.retryable, error.upstream_status) == (code, False, 200)
    for fragment in fragments:
        assert fragment in error.message


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_samples(name: str) -> None:
    status, code, retryable, retry_after, message = ERRORS[name]
    error = classify_error(status, sample(name), {})
    assert isinstance(error, UpstreamError)
    assert (error.code, error.retryable, error.retry_after, error.message) == (
        code,
        retryable,
        retry_after,
        message,
    )
    assert error.upstream_status == status


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_samples_inside_a_200(name: str) -> None:
    status, code, retryable, _, _ = ERRORS[name]
    with pytest.raises(UpstreamError) as caught:
        parse_success(sample(name))
    assert (caught.value.code, caught.value.retryable, caught.value.upstream_status) == (
        code,
        retryable,
        status,
    )


# ---------------------------------------------------------------- success shapes


def test_thought_texts_and_images_are_skipped() -> None:
    body = gemini(
        {"text": "thinking", "thought": True},
        {"inlineData": {"mimeType": "image/png", "data": PNG_B64}, "thought": True},
        {"text": "Done."},
        {"inlineData": {"mimeType": "image/jpeg", "data": PNG_B64}},
        {"text": "", "thoughtSignature": "abc"},
    )
    result = parse_success(body)
    assert result.texts == ["Done."]
    assert result.images == [ImagePart(data=PNG, url=None, declared_mime="image/jpeg")]


def test_only_thought_images_means_no_image() -> None:
    body = gemini({"inlineData": {"mimeType": "image/png", "data": PNG_B64}, "thought": True})
    with pytest.raises(ResponseError) as caught:
        parse_success(body)
    assert caught.value.code == "no_image"


def test_usage_is_kept_untouched() -> None:
    usage = {"promptTokenCount": 3, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 3}]}
    result = parse_success(gemini({"inline_data": {"data": PNG_B64}}, usageMetadata=usage))
    assert result.usage == usage
    assert result.images[0].declared_mime is None


def test_streamed_chunks_are_merged() -> None:
    chunks = [
        json.loads(gemini({"text": "Here it is."}, finish=None)),
        json.loads(gemini({"inlineData": {"data": PNG_B64}}, usageMetadata={"totalTokenCount": 9})),
    ]
    chunks[1]["modelVersion"] = "gemini-3-pro-image-preview"
    result = parse_success(json.dumps(chunks).encode())
    assert result == UpstreamResult(
        images=[ImagePart(data=PNG, url=None, declared_mime=None)],
        texts=["Here it is."],
        usage={"totalTokenCount": 9},
        finish_reason="STOP",
        model_version="gemini-3-pro-image-preview",
    )


def test_openai_style_url_data_url_and_revised_prompt() -> None:
    body = json.dumps(
        {
            "created": 1,
            "data": [
                {"url": "https://cdn.example/a.png", "revised_prompt": "A llama, photorealistic"},
                {"url": f"data:image/webp;base64,{PNG_B64}"},
                {"b64_json": f"data:image/png;base64,{PNG_B64}", "revised_prompt": "  "},
            ],
            "usage": {"total_tokens": 5},
        }
    ).encode()
    result = parse_success(body)
    assert result.images == [
        ImagePart(data=None, url="https://cdn.example/a.png", declared_mime=None),
        ImagePart(data=PNG, url=None, declared_mime="image/webp"),
        ImagePart(data=PNG, url=None, declared_mime="image/png"),
    ]
    assert result.texts == ["A llama, photorealistic"]
    assert result.usage == {"total_tokens": 5}


def test_null_error_field_next_to_data_is_a_success() -> None:
    body = json.dumps({"error": None, "data": [{"b64_json": PNG_B64}]}).encode()
    assert parse_success(body).images[0].data == PNG


def test_openai_style_without_images_is_no_image() -> None:
    with pytest.raises(ResponseError) as caught:
        parse_success(b'{"created": 1, "data": []}')
    assert (caught.value.code, caught.value.retryable) == ("no_image", False)


def test_image_part_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError):
        ImagePart(data=None, url=None, declared_mime=None)
    with pytest.raises(ValueError):
        ImagePart(data=b"x", url="https://x", declared_mime=None)


# ---------------------------------------------------------------- base64


@pytest.mark.parametrize(
    "encoded",
    [
        PNG_B64,
        PNG_B64.rstrip("="),
        base64.urlsafe_b64encode(PNG).decode(),
        base64.urlsafe_b64encode(PNG).decode().rstrip("="),
        base64.encodebytes(PNG).decode(),  # MIME style: a newline every 76 chars
        "\r\n".join(PNG_B64[i : i + 20] for i in range(0, len(PNG_B64), 20)),
    ],
    ids=["standard", "no-padding", "url-safe", "url-safe-no-padding", "newlines", "crlf"],
)
def test_base64_forms(encoded: str) -> None:
    body = gemini({"inlineData": {"mimeType": "image/png", "data": encoded}})
    assert parse_success(body).images[0].data == PNG


@pytest.mark.parametrize("encoded", ["not base64!", "abcde", "", "====", 12345, None])
def test_invalid_base64_is_a_bad_response(encoded: object) -> None:
    with pytest.raises(ResponseError) as caught:
        parse_success(gemini({"inlineData": {"mimeType": "image/png", "data": encoded}}))
    assert (caught.value.code, caught.value.retryable) == ("bad_upstream_response", True)


# ---------------------------------------------------------------- no image


@pytest.mark.parametrize("reason", sorted(BLOCKING_FINISH_REASONS))
def test_blocking_finish_reasons(reason: str) -> None:
    with pytest.raises(ResponseError) as caught:
        parse_success(gemini({"text": "I can't help with that."}, finish=reason))
    assert (caught.value.code, caught.value.retryable) == ("content_blocked", False)
    assert reason in caught.value.message
    assert "I can't help with that." in caught.value.message


@pytest.mark.parametrize(
    "reason", ["NO_IMAGE", "IMAGE_OTHER", "MAX_TOKENS", "OTHER", "STOP", "FINISH_REASON_UNSPECIFIED"]
)
def test_other_finish_reasons_without_image(reason: str) -> None:
    with pytest.raises(ResponseError) as caught:
        parse_success(gemini(finish=reason))
    assert (caught.value.code, caught.value.retryable, caught.value.upstream_status) == (
        "no_image",
        False,
        200,
    )
    assert reason in caught.value.message


def test_an_image_is_returned_despite_a_blocking_finish_reason() -> None:
    body = gemini({"inlineData": {"data": PNG_B64}}, finish="SAFETY")
    assert parse_success(body).finish_reason == "SAFETY"


@pytest.mark.parametrize(
    "body",
    [
        b'{"candidates": []}',
        b'{"usageMetadata": {"promptTokenCount": 1}}',
        b'{"candidates": [{"index": 0}]}',
        b'{"candidates": [{"content": {"role": "model"}}]}',
    ],
)
def test_empty_candidates_are_no_image(body: bytes) -> None:
    with pytest.raises(ResponseError) as caught:
        parse_success(body)
    assert caught.value.code == "no_image"


def test_blocked_candidate_without_content() -> None:
    body = b'{"candidates": [{"finishReason": "PROHIBITED_CONTENT", "finishMessage": "Blocked by policy."}]}'
    with pytest.raises(ResponseError) as caught:
        parse_success(body)
    assert caught.value.code == "content_blocked"
    assert "PROHIBITED_CONTENT" in caught.value.message and "Blocked by policy." in caught.value.message


def test_snake_case_prompt_feedback_with_message() -> None:
    body = b'{"prompt_feedback": {"block_reason": "OTHER", "block_reason_message": "Not allowed."}}'
    with pytest.raises(ResponseError) as caught:
        parse_success(body)
    assert caught.value.code == "content_blocked"
    assert "OTHER" in caught.value.message and "Not allowed." in caught.value.message


def test_long_model_text_is_truncated() -> None:
    with pytest.raises(ResponseError) as caught:
        parse_success(gemini({"text": "blah " * 1000}, finish="STOP"))
    assert "…" in caught.value.message
    assert 500 < len(caught.value.message) < 600


# ---------------------------------------------------------------- unreadable 2xx


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html><body>Bad gateway</body></html>",
        b"\xff\xfe garbage",
        b'{"candidates": [',
        b"{}",
        b"[]",
        b"null",
        b'"ok"',
        b'{"foo": 1}',
        b'{"candidates": {"0": {}}}',
        b'{"candidates": ["x"]}',
        b'{"candidates": [{"content": {"parts": {"text": "x"}}}]}',
        b'{"candidates": [{"content": {"parts": ["x"]}}]}',
        b'{"candidates": [{"content": "x"}]}',
        b'{"data": ["x"]}',
        b'{"data": [{"revised_prompt": "no image"}]}',
    ],
)
def test_unreadable_2xx_is_a_retryable_bad_response(body: bytes) -> None:
    with pytest.raises(ResponseError) as caught:
        parse_success(body)
    assert (caught.value.code, caught.value.retryable) == ("bad_upstream_response", True)


def test_non_json_2xx_message_shows_the_body() -> None:
    with pytest.raises(ResponseError) as caught:
        parse_success(b"<html>\n  <title>Oops</title>\n</html>" + b"x" * 1000)
    assert caught.value.message.startswith("HTTP 2xx with a non-JSON body: <html> <title>Oops</title>")
    assert len(caught.value.message) < 260


def test_error_without_http_code_inside_a_200() -> None:
    body = b'{"error": {"message": "channel busy", "type": "new_api_error", "code": "busy"}}'
    with pytest.raises(UpstreamError) as caught:
        parse_success(body)
    error = caught.value
    assert (error.code, error.retryable, error.upstream_status) == ("upstream_unavailable", True, 200)
    assert "channel busy" in error.message


# ---------------------------------------------------------------- classify_error


def google_error(status: int, message: str = "boom", **extra: Any) -> bytes:
    return json.dumps({"error": {"code": status, "message": message, "status": "X", **extra}}).encode()


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (400, "upstream_rejected", False),
        (401, "upstream_auth", False),
        (403, "upstream_auth", False),
        (404, "upstream_not_found", False),
        (405, "upstream_rejected", False),
        (409, "upstream_rejected", False),
        (413, "upstream_rejected", False),
        (422, "upstream_rejected", False),
        (408, "upstream_unavailable", True),
        (499, "upstream_unavailable", True),
        (429, "upstream_rate_limited", True),
        (500, "upstream_unavailable", True),
        (501, "upstream_unavailable", True),
        (502, "upstream_unavailable", True),
        (503, "upstream_unavailable", True),
        (504, "upstream_unavailable", True),
        (520, "upstream_unavailable", True),
        (599, "upstream_unavailable", True),
        (302, "upstream_unavailable", True),
    ],
)
def test_status_table(status: int, code: str, retryable: bool) -> None:
    for body in (google_error(status), b"<html>nope</html>", b""):
        error = classify_error(status, body, {})
        assert (error.code, error.retryable, error.upstream_status) == (code, retryable, status)
        assert error.retry_after is None


def test_400_message_is_the_upstream_message() -> None:
    assert classify_error(400, google_error(400, "Bad image"), {}).message == "Bad image"


def test_daily_quota_among_several_violations() -> None:
    details = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaId": "PerMinute"}, {"quotaId": "GenerateRequestsPerDayPerProject"}],
        },
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"},
    ]
    error = classify_error(429, google_error(429, details=details), {})
    assert (error.code, error.retryable, error.retry_after) == ("upstream_quota_exhausted", False, 3.0)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "120"}, 120.0),
        ({"retry-after": "0"}, 0.0),
        ({"RETRY-AFTER": " 7 "}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        (httpx.Headers({"Retry-After": "42"}), 42.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # in the past
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": ""}, None),
        ({"X-Other": "5"}, None),
        ({}, None),
    ],
)
def test_retry_after_header(headers: Any, expected: float | None) -> None:
    error = classify_error(429, google_error(429), headers)
    assert (error.code, error.retry_after) == ("upstream_rate_limited", expected)


def test_retry_after_http_date_in_the_future() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    retry_after = classify_error(429, b"", {"Retry-After": when}).retry_after
    assert retry_after is not None and 80 < retry_after <= 90


def test_retry_delay_detail_wins_over_header() -> None:
    body = google_error(429, details=[{"retryDelay": "2s"}])
    assert classify_error(429, body, {"Retry-After": "60"}).retry_after == 2.0


def test_retry_after_only_for_429() -> None:
    assert (
        classify_error(
            503, google_error(503, details=[{"retryDelay": "2s"}]), {"Retry-After": "9"}
        ).retry_after
        is None
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("29.72s", 29.72), ("1.5s", 1.5), ("2s", 2.0), ("0s", 0.0), (" 3s ", 3.0), ("0.000000001s", 1e-9)],
)
def test_retry_delay_seconds(value: str, expected: float) -> None:
    assert retry_delay_seconds(value) == expected


@pytest.mark.parametrize("value", ["", "s", "29.72", "-1s", "1.5ms", "1m", "abc", "1.s", "1e3s"])
def test_retry_delay_seconds_rejects(value: str) -> None:
    assert retry_delay_seconds(value) is None


def test_html_body_message() -> None:
    html = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n<body>" + b"x" * 500
    error = classify_error(502, html, {"content-type": "text/html"})
    assert error.message.startswith("HTTP 502 with a non-JSON body: <!DOCTYPE html> <html><head><title>502")
    assert len(error.message) == len("HTTP 502 with a non-JSON body: ") + 200


@pytest.mark.parametrize("body", [b"", b"  \n"])
def test_empty_body_message(body: bytes) -> None:
    assert classify_error(503, body, {}).message == "HTTP 503 with an empty body"


@pytest.mark.parametrize("body", [b"[]", b'{"detail": "nope"}', b"null", b'[{"error": null}]'])
def test_unexpected_json_body_message(body: bytes) -> None:
    error = classify_error(500, body, {})
    assert error.message == f"HTTP 500 with an unexpected JSON body: {body.decode()}"
    assert error.code == "upstream_unavailable"


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": "quota exceeded"}',
        b'[{"error": {"message": "quota exceeded"}}]',
        b'{"error": {"message": "quota exceeded", "type": "rate_limit", "code": "rate_limit_exceeded"}}',
    ],
)
def test_other_error_object_forms(body: bytes) -> None:
    error = classify_error(429, body, {})
    assert (error.code, error.message) == ("upstream_rate_limited", "Upstream 429: quota exceeded")


def test_error_object_without_message_falls_back_to_the_body() -> None:
    error = classify_error(500, b'{"error": {"code": 500}}', {})
    assert error.message == 'HTTP 500 with an unexpected JSON body: {"error": {"code": 500}}'


# long base64 values are decoded from the body's bytes (services/json_scan.py: test_json_scan.py) ---------


def big_png(size: int = 200_000) -> bytes:
    """PNG-looking bytes of about ``size``: the signature, an IHDR of 64×32, then filler."""
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (64).to_bytes(4, "big") + (32).to_bytes(4, "big")
    return header + b"\x08\x02\x00\x00\x00" + os.urandom(size)


@pytest.mark.parametrize("container", [bytes, bytearray])
@pytest.mark.parametrize(
    "render",
    [
        lambda b64: {"candidates": [{"content": {"parts": [
            {"text": 'see "data": "x" \\ here'}, {"inlineData": {"mimeType": "image/png", "data": b64}}]},
            "finishReason": "STOP"}], "usageMetadata": {"totalTokenCount": 3}},
        lambda b64: {"candidates": [{"content": {"parts": [
            {"inline_data": {"mime_type": "image/png", "data": b64}}, {"text": "after"}]}}]},
        lambda b64: {"created": 1, "data": [{"b64_json": b64, "revised_prompt": "a fox"}]},
    ],
    ids=["camel", "snake", "openai"],
)  # fmt: skip
@pytest.mark.parametrize("indent", [None, 2])
def test_long_base64_values_decode_like_json_loads(render: Any, indent: int | None, container: type) -> None:
    image = big_png()
    body = container(json.dumps(render(base64.b64encode(image).decode()), indent=indent).encode())
    result = parse_success(body)
    assert [part.data for part in result.images] == [image]
    assert result.texts and result.texts[0] in ('see "data": "x" \\ here', "after", "a fox")


def test_long_values_with_escapes_or_under_other_keys_are_parsed_as_usual() -> None:
    image = big_png()
    b64 = base64.b64encode(image).decode()
    escaped = json.dumps({"created": 1, "data": [{"b64_json": b64}]}).replace("/", "\\/")
    assert parse_success(escaped.encode()).images[0].data == image
    text = "x" * 50_000
    body = gemini({"text": text}, {"inlineData": {"mimeType": "image/png", "data": b64}}, extra=b64)
    result = parse_success(body)
    assert result.texts == [text[:]] and result.images[0].data == image


def test_two_long_images_and_invalid_base64() -> None:
    first, second = big_png(), big_png(30_000)
    body = gemini(
        {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(first).decode()}},
        {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(second).decode()}},
    )
    assert [p.data for p in parse_success(body).images] == [first, second]
    bad = gemini({"inlineData": {"mimeType": "image/png", "data": "!" * 40_000}})
    with pytest.raises(ResponseError) as caught:
        parse_success(bad)
    assert caught.value.code == "bad_upstream_response"


def test_encode_result_reads_back_the_same() -> None:
    from services.upstream_response import encode_result

    image = big_png(20_000)
    inline = UpstreamResult(
        images=[ImagePart(data=image, url=None, declared_mime="image/png")],
        texts=["here"],
        usage={"totalTokenCount": 7},
        finish_reason="STOP",
        model_version="m1",
    )
    again = parse_success(encode_result(inline))
    assert (again.images, again.texts, again.usage) == (inline.images, inline.texts, inline.usage)
    linked = UpstreamResult(
        images=[ImagePart(data=None, url="https://x/1.png", declared_mime=None)],
        texts=["a fox"],
        usage={"total_tokens": 2},
        finish_reason=None,
        model_version=None,
    )
    again = parse_success(encode_result(linked))
    assert (again.images, again.texts, again.usage) == (linked.images, linked.texts, linked.usage)


def test_without_pybase64_binascii_decodes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    import services.upstream_response as module

    image = big_png()
    body = gemini({"inlineData": {"mimeType": "image/png", "data": base64.b64encode(image).decode()}})
    fast = parse_success(body).images[0].data
    monkeypatch.setattr(module, "_pybase64", None)
    assert parse_success(body).images[0].data == fast == image
    assert (
        parse_success(gemini({"inlineData": {"mimeType": "image/png", "data": PNG_B64}})).images[0].data
        == PNG
    )
