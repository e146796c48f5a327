"""End to end: submit → Celery worker → simulator over HTTP → S3 server → poll, on real processes."""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
from typing import Any

import boto3
import pytest
from PIL import Image

from devstack.processes import wait_until
from services.clock import parse_iso
from services.images import inspect_image
from services.storage import Storage
from tests.stack import Stack, directive_key, seed_body, with_directive


def s3_object(stack: Stack, key: str) -> tuple[dict, bytes]:
    config = stack.config
    client = boto3.client(
        "s3",
        endpoint_url=config.s3_endpoint_url,
        region_name=config.s3_region,
        aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=config.aws_secret_access_key,
    )
    obj = client.get_object(Bucket=config.s3_bucket, Key=key)
    return obj, obj["Body"].read()


def test_seed_example_succeeds_and_its_object_is_in_s3(stack: Stack) -> None:
    response = stack.submit(seed_body())
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert uuid.UUID(accepted["id"]).version == 4
    assert response.headers["Location"] == accepted["links"]["self"]
    assert accepted["links"]["self"].endswith(f"/v1/tasks/{accepted['id']}")

    task = stack.wait_final(accepted["id"])
    assert task["status"] == "succeeded", task
    assert task["model"] == "gemini-2.5-flash-image-preview"
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]
    assert task["error"] is None
    assert task["usage"] and task["usage"]["totalTokenCount"] > 0
    assert task["text"], "the simulator's text part is kept"
    [attempt] = task["attempts"]
    assert attempt["number"] == 1 and attempt["outcome"] == "succeeded" and attempt["upstream_status"] == 200
    assert attempt["duration_ms"] >= 0 and "worker" not in attempt

    [output] = task["outputs"]
    assert output["index"] == 0
    assert output["key"] == f"outputs/{task['id']}/1/0.png", "attempt 1's first output"
    assert (output["mime_type"], output["width"], output["height"]) == ("image/png", 1024, 1024)

    obj, data = s3_object(stack, output["key"])
    assert obj["ContentType"] == "image/png"
    assert obj["ContentLength"] == output["bytes"] == len(data)
    assert obj["Metadata"]["sha256"] == output["sha256"] == hashlib.sha256(data).hexdigest()
    assert Image.open(io.BytesIO(data)).size == (1024, 1024)

    downloaded = stack.http.get(output["url"])
    assert downloaded.status_code == 200 and downloaded.content == data


def test_uploads_carry_their_sha256_as_the_s3_checksum(stack: Stack) -> None:
    """The server can verify every body against our digest; the payload is not hashed a second time to
    sign it (``UNSIGNED-PAYLOAD``: the checksum header is signed instead)."""
    storage = Storage(stack.config)
    sent: list[dict[str, str]] = []

    def capture(request: Any, **_: Any) -> None:
        sent.append(
            {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        )

    storage._client.meta.events.register("before-send.s3.PutObject", capture)
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2)).save(buffer, "PNG")
    data = buffer.getvalue()
    stored = storage.put_image(f"tests/{uuid.uuid4()}.png", data, inspect_image(data))
    digest = hashlib.sha256(data)
    assert sent[0]["x-amz-checksum-sha256"] == base64.b64encode(digest.digest()).decode()
    assert sent[0]["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert "x-amz-checksum-sha256" in sent[0]["authorization"]  # a signed header
    obj, body = s3_object(stack, stored.key)
    assert body == data and obj["Metadata"]["sha256"] == stored.sha256 == digest.hexdigest()
    assert (stored.mime_type, stored.width, stored.height) == ("image/png", 3, 2)


def test_output_urls_are_signed_fresh_and_redirect(stack: Stack) -> None:
    task = stack.run(seed_body())
    redirect = stack.http.get(f"{stack.api_url}/v1/tasks/{task['id']}/outputs/0")
    assert redirect.status_code == 302
    assert stack.http.get(redirect.headers["Location"]).status_code == 200
    missing = stack.http.get(f"{stack.api_url}/v1/tasks/{task['id']}/outputs/7")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "index"


def test_metadata_is_echoed_and_not_forwarded(stack: Stack) -> None:
    body = {**seed_body(), "metadata": {"user": "u-1", "batch": 7}}
    task = stack.run(body)
    assert task["status"] == "succeeded" and task["metadata"] == {"user": "u-1", "batch": 7}


@pytest.mark.parametrize(
    ("shape", "image_format", "mimes"),
    [
        ("camel", "png", ["image/png"]),
        ("snake", "png", ["image/png"]),
        ("thought", "png", ["image/png"]),
        ("two", "png", ["image/png", "image/png"]),
        ("openai", "png", ["image/png"]),
        ("openai_url", "png", ["image/png"]),
        ("camel", "jpeg", ["image/jpeg"]),
        ("mislabeled", "png", ["image/jpeg"]),
    ],
)
def test_every_response_shape(stack: Stack, shape: str, image_format: str, mimes: list[str]) -> None:
    body = with_directive(shape=shape, format=image_format)
    body["generationConfig"]["imageConfig"]["aspectRatio"] = "16:9"
    task = stack.run(body)
    assert task["status"] == "succeeded", task
    assert [output["mime_type"] for output in task["outputs"]] == mimes
    for output in task["outputs"]:
        assert (output["width"], output["height"]) == (1344, 768)
        assert output["key"].endswith(".png" if output["mime_type"] == "image/png" else ".jpg")
        _, data = s3_object(stack, output["key"])
        assert hashlib.sha256(data).hexdigest() == output["sha256"]


def test_three_pro_dimensions_follow_size(stack: Stack) -> None:
    body = with_directive()
    body["model"] = "gemini-3-pro-image-preview"
    body["generationConfig"]["imageConfig"].update(aspectRatio="21:9", imageSize="2K")
    task = stack.run(body)
    assert [(o["width"], o["height"]) for o in task["outputs"]] == [(3168, 1344)]


@pytest.mark.parametrize(
    ("script", "outcomes", "first_error"),
    [
        ("503,500list,ok", ["retry", "retry", "succeeded"], "upstream_unavailable"),
        ("429,ok", ["retry", "succeeded"], "upstream_rate_limited"),
        ("timeout,ok", ["retry", "succeeded"], "upstream_timeout"),
        ("malformed,ok", ["retry", "succeeded"], "bad_upstream_response"),
        ("html,empty,ok", ["retry", "retry", "succeeded"], "upstream_unavailable"),
    ],
)
def test_retryable_errors_are_retried_then_succeed(
    stack: Stack, script: str, outcomes: list[str], first_error: str
) -> None:
    body = with_directive(script=script, hang_s="10", retry_delay="0.4s")
    key = directive_key(body)
    task = stack.run(body)
    assert task["status"] == "succeeded", task
    assert [attempt["outcome"] for attempt in task["attempts"]] == outcomes
    assert task["attempts"][0]["error_code"] == first_error
    assert stack.sim_calls(key) == len(outcomes)
    if script.startswith("429"):
        first, second = task["attempts"][:2]
        waited = (parse_iso(second["started_at"]) - parse_iso(first["finished_at"])).total_seconds()
        assert waited >= 0.4, "the upstream's retryDelay is honoured"


@pytest.mark.parametrize(
    ("script", "code", "upstream_status"),
    [
        ("400", "upstream_rejected", 400),
        ("401", "upstream_auth", 401),
        ("403", "upstream_auth", 403),
        ("404", "upstream_not_found", 404),
        ("safety", "content_blocked", 200),
        ("blocked", "content_blocked", 200),
        ("textonly", "no_image", 200),
    ],
)
def test_final_errors_fail_at_once(stack: Stack, script: str, code: str, upstream_status: int) -> None:
    body = with_directive(script=script)
    key = directive_key(body)
    task = stack.run(body)
    assert task["status"] == "failed", task
    assert task["error"]["code"] == code
    assert task["error"]["retryable"] is False
    assert task["error"]["message"]
    assert task["outputs"] == []
    assert [attempt["outcome"] for attempt in task["attempts"]] == ["failed"]
    if upstream_status != 200:
        assert task["error"]["upstream_status"] == upstream_status
    assert stack.sim_calls(key) == 1


def test_retryable_errors_exhaust_the_attempts(stack: Stack) -> None:
    body = with_directive(script="503")
    key = directive_key(body)
    task = stack.run(body)
    assert task["status"] == "failed"
    assert task["error"] == {
        "code": "upstream_unavailable",
        "message": task["error"]["message"],
        "retryable": True,
        "upstream_status": 503,
    }
    assert [attempt["outcome"] for attempt in task["attempts"]] == ["retry", "retry", "failed"]
    assert stack.sim_calls(key) == stack.config.max_attempts == 3


@pytest.mark.parametrize(
    ("script", "code"), [("429day", "upstream_quota_exhausted"), ("429", "upstream_rate_limited")]
)
def test_refusals_hold_the_task_then_fail_at_the_deadline(stack: Stack, script: str, code: str) -> None:
    """A 429 uses no attempt: the task waits (UPSTREAM_HOLD_SECONDS=2 here) and then fails."""
    body = with_directive(script=script, retry_delay="0.3s")
    key = directive_key(body)
    task = stack.run(body)
    assert task["status"] == "failed" and task["error"]["code"] == code
    assert task["error"]["upstream_status"] == 429
    hold = stack.config.upstream_hold_seconds
    waited = (parse_iso(task["finished_at"]) - parse_iso(task["created_at"])).total_seconds()
    assert hold - 1 <= waited <= hold + 2
    assert stack.sim_calls(key) == len(task["attempts"]) > stack.config.max_attempts, "429s use no attempt"


def test_an_answer_whose_image_url_fails_to_download_is_kept_and_not_paid_again(stack: Stack) -> None:
    """The upstream answered with an image URL, and its download failed: the retry downloads from the
    saved answer instead of calling (and paying) the upstream again."""
    body = with_directive(shape="openai_url", download_fails="1")
    key = directive_key(body)
    task = stack.run(body)
    assert task["status"] == "succeeded", task
    assert [(a["outcome"], a["error_code"]) for a in task["attempts"]] == [
        ("retry", "upstream_unavailable"),
        ("succeeded", None),
    ]
    assert stack.sim_calls(key) == 1, "the upstream was called once"
    assert stack.sim_stats()["downloads_by_key"][key] == 2
    assert stack.output_objects(task["id"]) == [output["key"] for output in task["outputs"]]


def test_cancel_a_running_task_records_nothing_after_it(stack: Stack) -> None:
    body = with_directive(delay_ms="1500")
    task_id = stack.submit(body).json()["id"]
    wait_until(lambda: stack.task(task_id)["status"] == "running", timeout=10, what="the task to run")
    response = stack.http.post(f"{stack.api_url}/v1/tasks/{task_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    # The upstream call is cut off (tests/test_cancel.py), or, if its answer came first, the worker sees
    # its result refused and deletes what it uploaded: either way the task stays canceled, with no
    # outputs, and no object is left.
    handled = (
        f"task {task_id}: attempt 1's upstream call was cut off",
        f"task {task_id}: attempt 1's failure is not recorded",
        f"task {task_id}: attempt 1's result is not recorded",
    )
    wait_until(
        lambda: any(line in stack.worker_logs() for line in handled), timeout=15, what="the worker to be done"
    )
    assert stack.sim_calls(directive_key(body)) == 1
    task = stack.task(task_id)
    assert task["status"] == "canceled" and task["outputs"] == [] and task["finished_at"]
    assert stack.output_objects(task_id) == [], "the refused attempt's upload is deleted"
    again = stack.http.post(f"{stack.api_url}/v1/tasks/{task_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_transition"
    assert again.json()["error"]["message"] == f"task {task_id} is already canceled (final)"
    missing = stack.http.post(f"{stack.api_url}/v1/tasks/nope/cancel")
    assert missing.status_code == 404
