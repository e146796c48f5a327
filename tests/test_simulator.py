"""The upstream simulator over real HTTP: shapes, scripts, faults, sizes, observability and the CLI."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from simulator.cli import build_parser, config_from_args
from simulator.server import SimConfig, SimServer, start_in_thread

PRO = "gemini-3-pro-image-preview"
FLASH = "gemini-2.5-flash-image"
PIXEL_PNG = (  # the 16x16 input image of samples/request-seed-example.json
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2"
    "AAAAFklEQVR4nGM4UaFBEmIY1TCqYfhqAAADaGgQ43GRdgAAAABJRU5ErkJggg=="
)
PATH = "/v1/images/generations"
ROOT = Path(__file__).resolve().parents[1]


def request_body(text: str = "a llama", model: str = PRO, ratio: str = "1:1", size: str = "1K") -> dict:
    parts = [{"text": text}, {"inline_data": {"mime_type": "image/png", "data": PIXEL_PNG}}]
    return {
        "model": model,
        "contents": [{"role": "user", "parts": parts}],
        "generationConfig": {
            "responseModalities": ["TEXT", "IMAGE"],
            "imageConfig": {"aspectRatio": ratio, "imageSize": size},
        },
    }


@contextmanager
def running(config: SimConfig, **client_options: Any) -> Iterator[tuple[SimServer, httpx.Client]]:
    server, base_url = start_in_thread(config)
    try:
        with httpx.Client(base_url=base_url, timeout=10, **client_options) as client:
            yield server, client
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with running(SimConfig()) as (_, client):
        yield client


def generate(client: httpx.Client, text: str = "a llama", **fields: str) -> httpx.Response:
    return client.post(PATH, json=request_body(text, **fields))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.01)


def settled_stats(client: httpx.Client) -> dict:
    """Stats once no call is in flight (in_flight drops just after a reply is written)."""
    wait_until(lambda: client.get("/_sim/stats").json()["in_flight"] == 0)
    return client.get("/_sim/stats").json()


def open_image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def camel_images(payload: dict) -> list[dict]:
    return [part for part in payload["candidates"][0]["content"]["parts"] if "inlineData" in part]


@pytest.mark.parametrize(
    ("model", "ratio", "size", "dims"),
    [
        (FLASH, "16:9", "4K", (1344, 768)),
        (FLASH, "3:4", "1K", (864, 1184)),
        (PRO, "21:9", "1K", (1584, 672)),
        (PRO, "2:3", "2K", (1696, 2528)),
        (PRO, "9:16", "4K", (3072, 5504)),
    ],
)
def test_dimensions_follow_the_table(
    client: httpx.Client, model: str, ratio: str, size: str, dims: tuple[int, int]
) -> None:
    response = generate(client, model=model, ratio=ratio, size=size)
    assert response.status_code == 200
    payload = response.json()
    assert payload["modelVersion"] == model
    assert payload["candidates"][0]["finishReason"] == "STOP"
    assert payload["candidates"][0]["content"]["parts"][0]["text"]
    (part,) = camel_images(payload)
    assert part["inlineData"]["mimeType"] == "image/png"
    image = open_image(part["inlineData"]["data"])
    assert (image.format, image.size) == ("PNG", dims)


def test_image_bytes_target_is_met_by_a_valid_png() -> None:
    with running(SimConfig(image_bytes=1_500_000)) as (_, client):
        (part,) = camel_images(generate(client).json())
    data = base64.b64decode(part["inlineData"]["data"], validate=True)
    assert abs(len(data) - 1_500_000) <= 150_000
    image = open_image(part["inlineData"]["data"])
    assert (image.format, image.size) == ("PNG", (1024, 1024))


def test_jpeg_by_config_and_by_directive() -> None:
    with running(SimConfig(image_format="jpeg", image_bytes=400_000)) as (_, client):
        (by_config,) = camel_images(generate(client, ratio="4:3").json())
    with running(SimConfig()) as (_, client):
        (by_directive,) = camel_images(generate(client, "[sim format=jpeg]", ratio="4:3").json())
    for part in (by_config, by_directive):
        assert part["inlineData"]["mimeType"] == "image/jpeg"
        image = open_image(part["inlineData"]["data"])
        assert (image.format, image.size) == ("JPEG", (1200, 896))
    assert abs(len(base64.b64decode(by_config["inlineData"]["data"])) - 400_000) <= 40_000


@pytest.mark.parametrize(
    ("item", "status", "error_status"),
    [
        ("400", 400, "INVALID_ARGUMENT"),
        ("401", 401, "PERMISSION_DENIED"),
        ("403", 403, "PERMISSION_DENIED"),
        ("404", 404, "NOT_FOUND"),
        ("429", 429, "RESOURCE_EXHAUSTED"),
        ("429day", 429, "RESOURCE_EXHAUSTED"),
        ("500", 500, "INTERNAL"),
        ("502", 502, "UNAVAILABLE"),
        ("503", 503, "UNAVAILABLE"),
        ("504", 504, "DEADLINE_EXCEEDED"),
    ],
)
def test_error_items_return_gemini_error_bodies(
    client: httpx.Client, item: str, status: int, error_status: str
) -> None:
    response = generate(client, f"[sim script={item}]")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (status, error_status)
    assert error["message"]


def test_429_carries_a_retry_delay(client: httpx.Client) -> None:
    details = generate(client, "[sim script=429]").json()["error"]["details"]
    retry = [d for d in details if d["@type"].endswith("RetryInfo")]
    assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]
    details = generate(client, "[sim script=429 retry_delay=0.2s]").json()["error"]["details"]
    assert details[-1]["retryDelay"] == "0.2s"
    with running(SimConfig(retry_delay_s=2.5)) as (_, other):
        assert generate(other, "[sim script=429]").json()["error"]["details"][-1]["retryDelay"] == "2.5s"


def test_429day_names_a_daily_quota_without_retry_info(client: httpx.Client) -> None:
    details = generate(client, "[sim script=429day]").json()["error"]["details"]
    assert all("retryDelay" not in detail for detail in details)
    assert "PerDay" in details[0]["violations"][0]["quotaId"]


def test_500list_is_wrapped_in_a_list(client: httpx.Client) -> None:
    response = generate(client, "[sim script=500list]")
    assert response.status_code == 500
    assert response.json() == [
        {"error": {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}}
    ]


def test_malformed_html_and_empty_bodies(client: httpx.Client) -> None:
    malformed = generate(client, "[sim script=malformed]")
    assert malformed.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        malformed.json()
    html = generate(client, "[sim script=html]")
    assert html.status_code == 502
    assert html.headers["content-type"] == "text/html"
    assert html.text.startswith("<html>")
    empty = generate(client, "[sim script=empty]")
    assert (empty.status_code, empty.content) == (503, b"")


def test_no_image_items_answer_200_without_an_image(client: httpx.Client) -> None:
    safety = generate(client, "[sim script=safety]")
    assert safety.status_code == 200
    candidate = safety.json()["candidates"][0]
    assert (candidate["finishReason"], candidate["content"]["parts"]) == ("IMAGE_SAFETY", [])
    blocked = generate(client, "[sim script=blocked]").json()
    assert blocked["promptFeedback"]["blockReason"] == "PROHIBITED_CONTENT"
    assert "candidates" not in blocked
    text_only = generate(client, "[sim script=textonly]").json()
    parts = text_only["candidates"][0]["content"]["parts"]
    assert [list(part) for part in parts] == [["text"]]


def test_shape_camel_is_the_default(client: httpx.Client) -> None:
    payload = generate(client, "[sim shape=camel]", ratio="3:2").json()
    assert set(payload) == {"candidates", "usageMetadata", "modelVersion"}
    (part,) = camel_images(payload)
    assert open_image(part["inlineData"]["data"]).size == (1264, 848)


def test_shape_snake_uses_snake_case_keys(client: httpx.Client) -> None:
    payload = generate(client, "[sim shape=snake]", ratio="3:2").json()
    assert set(payload) == {"candidates", "usage_metadata", "model_version"}
    candidate = payload["candidates"][0]
    assert candidate["finish_reason"] == "STOP"
    (part,) = [part for part in candidate["content"]["parts"] if "inline_data" in part]
    assert part["inline_data"]["mime_type"] == "image/png"
    assert open_image(part["inline_data"]["data"]).size == (1264, 848)
    assert "inlineData" not in json.dumps(payload) and "finishReason" not in json.dumps(payload)


def test_shape_thought_ends_with_the_final_image(client: httpx.Client) -> None:
    parts = generate(client, "[sim shape=thought]", ratio="3:2").json()["candidates"][0]["content"]["parts"]
    assert [part.get("thought", False) for part in parts] == [True, True, False]
    assert "text" in parts[0]
    thought = open_image(parts[1]["inlineData"]["data"])
    final = open_image(parts[2]["inlineData"]["data"])
    assert final.size == (1264, 848)
    assert thought.size != final.size


def test_shape_two_has_text_between_two_images(client: httpx.Client) -> None:
    parts = generate(client, "[sim shape=two]", ratio="3:2").json()["candidates"][0]["content"]["parts"]
    assert ["inlineData" in part for part in parts] == [True, False, True]
    first, second = (open_image(parts[i]["inlineData"]["data"]) for i in (0, 2))
    assert first.size == second.size == (1264, 848)
    assert first.getpixel((0, 0)) != second.getpixel((0, 0))


def test_shape_openai_carries_b64_json(client: httpx.Client) -> None:
    payload = generate(client, "[sim shape=openai]", ratio="3:2").json()
    assert set(payload) == {"created", "data"}
    (item,) = payload["data"]
    assert item["revised_prompt"] == ""
    assert open_image(item["b64_json"]).size == (1264, 848)


def test_shape_openai_url_serves_the_image(client: httpx.Client) -> None:
    (item,) = generate(client, "[sim shape=openai_url format=jpeg]", ratio="3:2").json()["data"]
    assert "b64_json" not in item
    image = client.get(item["url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(image.content)).size == (1264, 848)
    assert client.get("/_sim/images/unknown").status_code == 404


def test_download_fails_makes_the_first_downloads_of_a_key_fail(client: httpx.Client) -> None:
    (item,) = generate(client, "[sim key=d shape=openai_url download_fails=2]").json()["data"]
    assert [client.get(item["url"]).status_code for _ in range(3)] == [503, 503, 200]
    assert client.get("/_sim/stats").json()["downloads_by_key"] == {"d": 3}


def test_shape_mislabeled_declares_png_for_jpeg_bytes(client: httpx.Client) -> None:
    (part,) = camel_images(generate(client, "[sim shape=mislabeled]", ratio="3:2").json())
    assert part["inlineData"]["mimeType"] == "image/png"
    image = open_image(part["inlineData"]["data"])
    assert (image.format, image.size) == ("JPEG", (1264, 848))


def test_key_scripts_advance_per_key_and_repeat_the_last_item(client: httpx.Client) -> None:
    a, b = "[sim key=a script=429,500,ok]", "[sim key=b script=503,ok]"
    statuses = [generate(client, text).status_code for text in (a, b, a, b, a, a)]
    assert statuses == [429, 503, 500, 200, 200, 200]
    shared = [generate(client, f"call {i} [sim script=502,ok]").status_code for i in range(3)]
    assert shared == [502, 200, 200]
    assert client.get("/_sim/stats").json()["by_key"] == {"a": 4, "b": 2, "502,ok": 3}


def test_stats_calls_and_reset(client: httpx.Client) -> None:
    generate(client, "[sim key=x script=500,ok]")
    generate(client, "[sim key=x script=500,ok]", model=FLASH)
    generate(client, "plain")
    stats = settled_stats(client)
    assert stats == {
        "calls": 3,
        "in_flight": 0,
        "max_in_flight": 1,
        "by_key": {"x": 2},
        "by_outcome": {"500": 1, "ok": 2},
        "downloads_by_key": {},
    }
    calls = client.get("/_sim/calls").json()
    assert [(c["key"], c["outcome"], c["model"], c["status"]) for c in calls] == [
        ("x", "500", PRO, 500),
        ("x", "ok", FLASH, 200),
        (None, "ok", PRO, 200),
    ]
    assert all(c["started"] <= c["finished"] for c in calls)
    assert client.post("/_sim/reset").status_code == 200
    assert client.get("/_sim/stats").json() == {
        "calls": 0,
        "in_flight": 0,
        "max_in_flight": 0,
        "by_key": {},
        "by_outcome": {},
        "downloads_by_key": {},
    }
    assert client.get("/_sim/calls").json() == []
    assert generate(client, "[sim key=x script=500,ok]").status_code == 500


def test_holds_200_concurrent_slow_requests() -> None:
    """Each call is held far longer than 200 take to arrive, then all are released at once (what the
    server's shutdown does to held calls): a hold of 1 s let the first calls end before the last arrived
    on a slow machine, so 200 were never in flight together."""
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
    with running(SimConfig(), limits=limits) as (server, client), ThreadPoolExecutor(200) as pool:
        futures = [pool.submit(generate, client, f"slow {i} [sim delay_ms=60000]") for i in range(200)]
        wait_until(lambda: client.get("/_sim/stats").json()["in_flight"] == 200, timeout=30)
        server.stopping.set()
        assert [future.result().status_code for future in futures] == [200] * 200
        stats = settled_stats(client)
    # all 200 held at once (no wall-clock bound: a timed assertion flakes on a busy machine)
    assert stats["max_in_flight"] == 200


def test_api_key_is_required_when_configured() -> None:
    with running(SimConfig(api_key="secret")) as (_, client):
        missing = generate(client)
        wrong = client.post(PATH, json=request_body(), headers={"Authorization": "Bearer nope"})
        right = client.post(PATH, json=request_body(), headers={"Authorization": "Bearer secret"})
        outcomes = client.get("/_sim/stats").json()["by_outcome"]
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["status"] == "PERMISSION_DENIED"
    assert right.status_code == 200
    assert outcomes == {"unauthorized": 2, "ok": 1}


def _with(path: str, value: Any) -> bytes:
    body = request_body()
    *parents, last = path.split(".")
    target = body
    for name in parents:
        target = target[name]
    target[last] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_with("generationConfig.imageConfig.aspectRatio", "7:3"), "Unsupported aspect ratio: 7:3"),
        (_with("generationConfig.imageConfig.imageSize", "8K"), "Unsupported image size: 8K"),
        (_with("contents", []), "contents"),
        (_with("model", 3), "model"),
        (_with("generationConfig.responseModalities", ["TEXT"]), "responseModalities"),
        (
            _with("contents", [{"parts": [{"inline_data": {"mime_type": "image/gif", "data": "AA=="}}]}]),
            "MIME",
        ),
        (
            _with("contents", [{"parts": [{"inline_data": {"mime_type": "image/png", "data": "@@"}}]}]),
            "base64",
        ),
        (b"{not json", "Invalid JSON"),
        (json.dumps(request_body("[sim script=nope]")).encode(), "script item"),
        (json.dumps(request_body("[sim shape=round]")).encode(), "shape"),
    ],
)
def test_invalid_requests_get_400(client: httpx.Client, content: bytes, message: str) -> None:
    response = client.post(PATH, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert message in error["message"]


FAULTY = {
    "fault_429": 0.15,
    "fault_500": 0.15,
    "fault_503": 0.1,
    "fault_safety": 0.1,
    "fault_malformed": 0.1,
}


def _texts() -> list[str]:
    return [f"prompt {i % 8} [sim key=k{i % 8}]" for i in range(40)]


def _outcomes(client: httpx.Client) -> list[tuple[str, str]]:
    return [(call["key"], call["outcome"]) for call in client.get("/_sim/calls").json()]


def test_random_faults_are_deterministic_under_a_seed() -> None:
    with running(SimConfig(seed=7, **FAULTY)) as (_, client):
        for text in _texts():
            generate(client, text)
        first = _outcomes(client)
        client.post("/_sim/reset")
        for text in _texts():
            generate(client, text)
        assert _outcomes(client) == first
        client.post("/_sim/reset")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda text: generate(client, text), _texts()))
        assert Counter(_outcomes(client)) == Counter(first)
    with running(SimConfig(seed=8, **FAULTY)) as (_, client):
        for text in _texts():
            generate(client, text)
        assert _outcomes(client) != first
    kinds = {outcome for _, outcome in first}
    assert "ok" in kinds and len(kinds) >= 4


def test_latency_is_applied_and_delay_ms_overrides_it() -> None:
    with running(SimConfig(latency_ms=150, latency_jitter_ms=50, seed=1)) as (_, client):
        generate(client)
        generate(client, "[sim delay_ms=0]")
        settled_stats(client)
        slow, fast = client.get("/_sim/calls").json()
    slow_s, fast_s = (call["finished"] - call["started"] for call in (slow, fast))
    assert 0.1 <= slow_s <= 1.0
    assert fast_s < slow_s - 0.05


def test_timeout_item_answers_504_after_hang_s(client: httpx.Client) -> None:
    response = generate(client, "[sim script=timeout hang_s=0.2]")
    assert response.status_code == 504
    assert response.json()["error"]["status"] == "DEADLINE_EXCEEDED"


def test_timeout_item_stops_when_the_client_disconnects(client: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        client.post(PATH, json=request_body("[sim script=timeout]"), timeout=0.3)
    wait_until(lambda: client.get("/_sim/stats").json()["in_flight"] == 0, timeout=3)
    (call,) = client.get("/_sim/calls").json()
    assert (call["outcome"], call["status"]) == ("timeout", None)


def test_timeout_item_returns_promptly_after_server_shutdown() -> None:
    server, base_url = start_in_thread(SimConfig())
    try:
        with httpx.Client(base_url=base_url, timeout=10) as client, ThreadPoolExecutor(1) as pool:
            future = pool.submit(generate, client, "[sim script=timeout]")
            wait_until(lambda: server.state.stats()["in_flight"] == 1)
            started = time.monotonic()
            server.shutdown()
            response = future.result(timeout=5)
            assert time.monotonic() - started < 2
    finally:
        server.server_close()
    assert response.status_code == 504
    assert response.headers["connection"] == "close"


def test_each_call_logs_one_line(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="simulator")
    generate(client, "[sim key=logged script=503,ok]")
    generate(client, "[sim key=logged script=503,ok]")
    client.get("/_sim/stats")
    wait_until(lambda: len(caplog.records) == 2)
    lines = [record.getMessage() for record in caplog.records]
    assert "key=logged" in lines[0] and "outcome=503 status=503" in lines[0]
    assert "outcome=ok status=200" in lines[1]


def test_unknown_routes_get_404(client: httpx.Client) -> None:
    assert client.get("/v1/models").status_code == 404
    assert client.post("/v1/other", json={}).json()["error"]["status"] == "NOT_FOUND"


def test_options_come_from_env_and_flags_win() -> None:
    env = {"SIM_LATENCY_MS": "50", "SIM_SEED": "3", "SIM_FAULT_503": "0.25", "SIM_API_KEY": "k"}
    args = build_parser(env).parse_args(["--seed", "4", "--format", "jpeg"])
    config = config_from_args(args)
    assert (config.latency_ms, config.seed, config.fault_503, config.api_key) == (50, 4, 0.25, "k")
    assert config.image_format == "jpeg"
    with pytest.raises(ValueError):
        config_from_args(build_parser({"SIM_FAULT_429": "0.7", "SIM_FAULT_500": "0.7"}).parse_args([]))


def test_cli_serves_and_logs(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "simulator", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "--fault-timeout" in help_text and "SIM_IMAGE_BYTES" in help_text
    log_file = tmp_path / "sim.log"
    command = [sys.executable, "-m", "simulator", "--port", "0", "--log", str(log_file), "--seed", "5"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            match = re.fullmatch(
                r"simulator listening on (http://127\.0\.0\.1:\d+)\n", process.stdout.readline()
            )
            assert match
            with httpx.Client(base_url=match.group(1), timeout=10) as cli_client:
                assert generate(cli_client).status_code == 200
            wait_until(lambda: "outcome=ok status=200" in log_file.read_text())
        finally:
            process.terminate()
            assert process.wait(timeout=5) == 0
