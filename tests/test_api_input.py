"""Bad input: every rejection is a 4xx in the error format, and nothing is stored or enqueued."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from devstack.processes import free_port
from services.queue import GENERATION_QUEUE
from tests.stack import ApiServer, Stack, seed_body

TINY_PNG = seed_body()["contents"][0]["parts"][1]["inline_data"]["data"]


def mutated(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = copy.deepcopy(seed_body())
    change(body)
    return body


def _parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body["contents"][0]["parts"]


BAD_BODIES = [
    ("not an object", [1, 2], "invalid_body", None),
    ("no model", mutated(lambda b: b.pop("model")), "missing_field", "model"),
    ("model not a string", mutated(lambda b: b.update(model=5)), "invalid_field", "model"),
    ("no contents", mutated(lambda b: b.pop("contents")), "missing_field", "contents"),
    ("empty contents", mutated(lambda b: b.update(contents=[])), "invalid_field", "contents"),
    (
        "empty parts",
        mutated(lambda b: b["contents"][0].update(parts=[])),
        "invalid_field",
        "contents[0].parts",
    ),
    (
        "part with nothing",
        mutated(lambda b: _parts(b).append({"foo": 1})),
        "invalid_field",
        "contents[0].parts[3]",
    ),
    (
        "bad base64",
        mutated(lambda b: _parts(b)[1]["inline_data"].update(data="not base64!!")),
        "invalid_base64",
        "contents[0].parts[1].inline_data.data",
    ),
    (
        "disallowed mime",
        mutated(lambda b: _parts(b)[1]["inline_data"].update(mime_type="image/gif")),
        "unsupported_mime_type",
        "contents[0].parts[1].inline_data.mime_type",
    ),
    (
        "too many images",
        mutated(
            lambda b: _parts(b).extend([{"inline_data": {"mime_type": "image/png", "data": TINY_PNG}}] * 13)
        ),
        "too_many_images",
        "contents",
    ),
    (
        "no generationConfig",
        mutated(lambda b: b.pop("generationConfig")),
        "missing_field",
        "generationConfig",
    ),
    (
        "no responseModalities",
        mutated(lambda b: b["generationConfig"].pop("responseModalities")),
        "missing_field",
        "generationConfig.responseModalities",
    ),
    (
        "bad aspect ratio",
        mutated(lambda b: b["generationConfig"]["imageConfig"].update(aspectRatio="7:3")),
        "invalid_field",
        "generationConfig.imageConfig.aspectRatio",
    ),
    (
        "bad image size",
        mutated(lambda b: b["generationConfig"]["imageConfig"].update(imageSize="8K")),
        "invalid_field",
        "generationConfig.imageConfig.imageSize",
    ),
    ("metadata not an object", mutated(lambda b: b.update(metadata=[1])), "invalid_field", "metadata"),
]


@pytest.fixture
def nothing_enqueued(stack: Stack) -> Iterator[None]:
    """Asserts that the test stores no task and enqueues no message."""
    client = redis.Redis.from_url(stack.env["REDIS_URL"])

    def counts() -> tuple[int, int]:
        return len(client.keys("iq:task:*")), client.llen(GENERATION_QUEUE)

    before = counts()
    yield
    assert counts() == before
    client.close()


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["field"] == field


@pytest.mark.parametrize(("name", "body", "code", "field"), BAD_BODIES, ids=[row[0] for row in BAD_BODIES])
@pytest.mark.usefixtures("nothing_enqueued")
def test_bad_body_is_rejected(stack: Stack, name: str, body: Any, code: str, field: str | None) -> None:
    assert_error(stack.submit(body), 400, code, field)


@pytest.mark.usefixtures("nothing_enqueued")
def test_non_json_body(stack: Stack) -> None:
    response = stack.http.post(
        f"{stack.api_url}/v1/images/generations",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 400, "invalid_json")


@pytest.mark.usefixtures("nothing_enqueued")
def test_wrong_content_type(stack: Stack) -> None:
    response = stack.http.post(
        f"{stack.api_url}/v1/images/generations",
        content=json.dumps(seed_body()),
        headers={"Content-Type": "text/plain"},
    )
    assert_error(response, 415, "unsupported_media_type", "Content-Type")


def test_unknown_task_is_404(stack: Stack) -> None:
    assert_error(stack.http.get(f"{stack.api_url}/v1/tasks/nope"), 404, "not_found", "id")
    assert_error(stack.http.get(f"{stack.api_url}/v1/nothing-here"), 404, "not_found")


def test_camel_case_parts_and_pass_through_fields_are_accepted(stack: Stack) -> None:
    body = seed_body()
    _parts(body)[1] = {"inlineData": {"mimeType": "image/png", "data": TINY_PNG}}
    body["safetySettings"] = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    response = stack.submit(body)
    assert response.status_code == 202, response.text
    assert stack.wait_final(response.json()["id"])["status"] == "succeeded"


@pytest.fixture
def small_limit_api(stack: Stack) -> Iterator[ApiServer]:
    api = ApiServer(dataclasses.replace(stack.config, max_body_bytes=64 * 1024))
    yield api
    api.stop()


@pytest.mark.usefixtures("nothing_enqueued")
def test_body_over_the_limit_is_413_before_it_is_read(stack: Stack, small_limit_api: ApiServer) -> None:
    big = mutated(
        lambda b: _parts(b)[1]["inline_data"].update(data=base64.b64encode(b"x" * 100_000).decode())
    )
    response = stack.http.post(f"{small_limit_api.url}/v1/images/generations", json=big)
    assert_error(response, 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit still holds while streaming
        payload = json.dumps(big).encode()
        for start in range(0, len(payload), 8192):
            yield payload[start : start + 8192]

    response = stack.http.post(
        f"{small_limit_api.url}/v1/images/generations",
        content=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 413, "payload_too_large")


@pytest.fixture
def keyed_api(stack: Stack) -> Iterator[ApiServer]:
    api = ApiServer(dataclasses.replace(stack.config, api_keys=(("default", "k-one"), ("default", "k-two"))))
    yield api
    api.stop()


def test_api_keys_are_required_when_configured(stack: Stack, keyed_api: ApiServer) -> None:
    url = f"{keyed_api.url}/v1/images/generations"
    assert_error(stack.http.post(url, json=seed_body()), 401, "unauthorized", "Authorization")
    wrong = stack.http.post(url, json=seed_body(), headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "unauthorized", "Authorization")
    ok = stack.http.post(url, json=seed_body(), headers={"Authorization": "Bearer k-two"})
    assert ok.status_code == 202
    task_url = f"{keyed_api.url}/v1/tasks/{ok.json()['id']}"
    assert stack.http.get(task_url).status_code == 401
    assert stack.http.get(task_url, headers={"Authorization": "Bearer k-one"}).status_code == 200
    assert stack.http.get(f"{keyed_api.url}/healthz").status_code == 200


def test_without_a_key_no_v1_path_answers_but_401(stack: Stack, keyed_api: ApiServer) -> None:
    """Not even one that matches no route, or not with this method: a 404 or 405 would tell which exist."""
    for method, path in [
        ("GET", "/v1/nothing-here"),
        ("GET", "/v1/tasks/some-id/cancel"),
        ("DELETE", "/v1/tasks/some-id"),
        ("GET", "/v1/images/generations"),
    ]:
        response = stack.http.request(method, f"{keyed_api.url}{path}")
        assert_error(response, 401, "unauthorized", "Authorization")
    keyed = {"Authorization": "Bearer k-one"}
    assert_error(stack.http.get(f"{keyed_api.url}/v1/nothing-here", headers=keyed), 404, "not_found")
    assert_error(stack.http.delete(f"{keyed_api.url}/v1/tasks/x", headers=keyed), 405, "method_not_allowed")
    assert_error(stack.http.get(f"{keyed_api.url}/nothing-here"), 404, "not_found")


def test_health_and_readiness(stack: Stack) -> None:
    assert stack.http.get(f"{stack.api_url}/healthz").json() == {"status": "ok"}
    ready = stack.http.get(f"{stack.api_url}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}


def test_not_ready_and_503_when_redis_is_unreachable(stack: Stack) -> None:
    dead = dataclasses.replace(
        stack.config, redis_url=f"redis://127.0.0.1:{free_port()}/0", store_timeout=0.5
    )
    api = ApiServer(dead)
    try:
        ready = stack.http.get(f"{api.url}/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"
        assert_error(
            stack.http.post(f"{api.url}/v1/images/generations", json=seed_body()), 503, "store_unavailable"
        )
        assert_error(stack.http.get(f"{api.url}/v1/tasks/anything"), 503, "store_unavailable")
    finally:
        api.stop()
