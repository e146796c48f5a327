"""Bad input: every rejection is a 4xx in the error format, and nothing is stored or enqueued."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import socket
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
    # every field the task record keeps is bounded
    ("model too long", mutated(lambda b: b.update(model="g" * 129)), "invalid_field", "model"),
    ("model of 1 MB", mutated(lambda b: b.update(model="g" * 1_000_000)), "invalid_field", "model"),
    ("model with a space", mutated(lambda b: b.update(model="gemini 2.5")), "invalid_field", "model"),
    ("model with a newline", mutated(lambda b: b.update(model="gemini\nx")), "invalid_field", "model"),
    ("model with markup", mutated(lambda b: b.update(model="<img src=x>")), "invalid_field", "model"),
    ("model not ASCII", mutated(lambda b: b.update(model="gémini")), "invalid_field", "model"),
    (
        "metadata too large",
        mutated(lambda b: b.update(metadata={"k": "x" * 5000})),
        "metadata_too_large",
        "metadata",
    ),
    (
        "metadata key too large",
        mutated(lambda b: b.update(metadata={"k" * 5000: 1})),
        "metadata_too_large",
        "metadata",
    ),
    (
        "metadata 6 levels deep",
        mutated(lambda b: b.update(metadata={"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}})),
        "invalid_field",
        "metadata",
    ),
    (
        "metadata array 6 deep",
        mutated(lambda b: b.update(metadata={"a": [[[[[1]]]]]})),
        "invalid_field",
        "metadata",
    ),
    (
        "webhook_url too long",
        mutated(lambda b: b.update(webhook_url="https://hooks.example.com/" + "a" * 2048)),
        "invalid_field",
        "webhook_url",
    ),
    (
        "webhook_url with a control character",
        mutated(lambda b: b.update(webhook_url="https://hooks.example.com/\x00")),
        "invalid_field",
        "webhook_url",
    ),
    (
        "webhook_events repeated",
        mutated(lambda b: b.update(webhook_url="https://hooks.example.com/", webhook_events=["failed"] * 2)),
        "invalid_field",
        "webhook_events",
    ),
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


def seed_with(fragment: str) -> bytes:
    """The seed body's JSON text with ``fragment`` (raw JSON text: ``"key": value``) added at the end,
    where it overrides a key of the seed's (the last of a repeated key wins)."""
    return (json.dumps(seed_body())[:-1] + ", " + fragment + "}").encode()


def deep(levels: int, opening: str = "[", closing: str = "]") -> str:
    return opening * levels + closing * levels


def case(name: str, raw: bytes, field: str | None) -> Any:
    return pytest.param(raw, field, id=name)


BAD_JSON = [
    pytest.param(b"", None, id="empty body"),
    pytest.param(b"\xff\xfe{}", None, id="not UTF-8"),
    pytest.param('{"model": "gémini"}'.encode("latin-1"), None, id="Latin-1 text"),
    pytest.param(json.dumps(seed_body()).encode()[:-1], None, id="truncated"),
    case("100,000 nested arrays", deep(100_000).encode(), None),
    case("100,000 nested objects", deep(100_000, '{"a":', "}").encode(), None),
    case("65 levels in contents", seed_with(f'"contents": [{{"parts": {deep(64)}}}]'), "contents"),
    case("900 levels in metadata", seed_with(f'"metadata": {{"a": {deep(900)}}}'), "metadata"),
    case("70 levels in a pass-through field", seed_with(f'"tools": {deep(70)}'), "tools"),
    case("NaN in a pass-through field", seed_with('"temperature": NaN'), None),
    case("Infinity in metadata", seed_with('"metadata": {"k": Infinity}'), None),
    case(
        "lone surrogate in a prompt",
        seed_with('"contents": [{"parts": [{"text": "a \\ud800 b"}]}]'),
        "contents",
    ),
    case("lone surrogate in metadata", seed_with('"metadata": {"k": "\\udfff"}'), "metadata"),
]


@pytest.mark.parametrize(("raw", "field"), BAD_JSON)
@pytest.mark.usefixtures("nothing_enqueued")
def test_bad_json_is_400(stack: Stack, raw: bytes, field: str | None) -> None:
    response = stack.http.post(
        f"{stack.api_url}/v1/images/generations", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid_json", field)


@pytest.mark.parametrize("fragment", ['"metadata": {"k": "\\udfff"}', f'"metadata": {{"a": {deep(500)}}}'])
@pytest.mark.usefixtures("nothing_enqueued")
def test_metadata_json_loads_takes_is_refused_all_the_same(stack: Stack, fragment: str) -> None:
    """json.loads takes these, json.dumps (the size check) did not: 500s. validate_submission refuses them
    (invalid_field); parse_json_body, once submission.py calls it, refuses them first (invalid_json)."""
    response = stack.http.post(
        f"{stack.api_url}/v1/images/generations",
        content=seed_with(fragment),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid_field", "invalid_json")
    assert response.json()["error"]["field"] == "metadata"


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
    assert_error(stack.http.put(f"{keyed_api.url}/v1/tasks/x", headers=keyed), 405, "method_not_allowed")
    assert_error(stack.http.get(f"{keyed_api.url}/nothing-here"), 404, "not_found")


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer",
        b"Bearer wrong",
        b"Basic " + base64.b64encode(b"default:k-one"),
        b"Token k-one",
        b"Bearer k-one-and-more",
        b"Bearer " + b"k" * 8000,
        b"Bearer \xff\xfe\x80 not utf-8",
        "Bearer cl\u00e9".encode("latin-1"),
        "Bearer cl\u00e9".encode(),
    ],
)
def test_odd_authorization_headers_get_401(keyed_api: ApiServer, value: bytes) -> None:
    status, body = raw_get(keyed_api, "/v1/tasks/some-id", value)
    assert (status, body["error"]["code"]) == (401, "unauthorized")


def test_health_and_readiness(stack: Stack) -> None:
    assert stack.http.get(f"{stack.api_url}/healthz").json() == {"status": "ok"}
    ready = stack.http.get(f"{stack.api_url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}, "no detail without the admin key"


ADMIN_KEY = "admin-key-for-readyz"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def admin_api(stack: Stack) -> Iterator[ApiServer]:
    api = ApiServer(dataclasses.replace(stack.config, admin_api_key=ADMIN_KEY))
    yield api
    api.stop()


# Authorization headers that are not the admin's, odd ones included: each gets the plain answer, never a 500.
NOT_THE_ADMIN: list[bytes] = [
    b"Bearer",
    b"Bearer ",
    b"Bearer wrong",
    b"Basic " + base64.b64encode(f"admin:{ADMIN_KEY}".encode()),
    f"Bearer {ADMIN_KEY}x".encode(),
    f"Bearer {ADMIN_KEY[:-1]}".encode(),
    f"Token {ADMIN_KEY}".encode(),
    f"Bearer\t{ADMIN_KEY}".encode(),
    b"Bearer \xff\xfe\x80 not utf-8",
    "Bearer cl\u00e9".encode("latin-1"),
    "Bearer cl\u00e9".encode(),
    b"Bearer " + b"k" * 8000,
]


def raw_get(api: ApiServer, path: str, authorization: bytes) -> tuple[int, Any]:
    """GET with an Authorization header of any bytes (httpx refuses to send some), over a plain socket."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as connection:
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
        connection.sendall(head + b"Authorization: " + authorization + b"\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_readiness_detail_is_for_the_admin_only(stack: Stack, admin_api: ApiServer) -> None:
    assert stack.http.get(f"{admin_api.url}/readyz").json() == {"status": "ready"}
    for value in NOT_THE_ADMIN:
        assert raw_get(admin_api, "/readyz", value) == (200, {"status": "ready"}), value
    detail = {"status": "ready", "checks": {"redis": "ok", "storage": "ok"}}
    for spelling in (f"Bearer {ADMIN_KEY}", f"bearer {ADMIN_KEY}", f"BEARER  {ADMIN_KEY} "):
        assert raw_get(admin_api, "/readyz", spelling.encode()) == (200, detail), spelling


def test_not_ready_and_503_when_redis_is_unreachable(stack: Stack) -> None:
    """Clients learn what is down, never where: no host, port or library text (the log has them)."""
    port = free_port()
    dead = dataclasses.replace(
        stack.config,
        redis_url=f"redis://127.0.0.1:{port}/0",
        store_timeout=0.5,
        s3_bucket="no-such-bucket",
        admin_api_key=ADMIN_KEY,
        api_keys=(("default", "k-one"),),
    )
    api = ApiServer(dead)
    try:
        ready = stack.http.get(f"{api.url}/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "unavailable"}
        detail = stack.http.get(f"{api.url}/readyz", headers=ADMIN)
        assert detail.status_code == 503
        assert detail.json()["checks"] == {
            "redis": "the task store is unavailable (ConnectionError)",
            "storage": "storage could not reach the bucket (ClientError 404)",
        }
        keyed = {"Authorization": "Bearer k-one"}
        submitted = stack.http.post(f"{api.url}/v1/images/generations", json=seed_body(), headers=keyed)
        assert_error(submitted, 503, "store_unavailable")
        assert_error(stack.http.get(f"{api.url}/v1/tasks/anything", headers=keyed), 503, "store_unavailable")
        for response in (detail, submitted):
            assert "127.0.0.1" not in response.text and str(port) not in response.text
            assert "no-such-bucket" not in response.text and "Error 111" not in response.text
    finally:
        api.stop()
