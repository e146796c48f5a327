"""Waiting for a task: ``Prefer: wait`` on submit and on GET, and the event stream
``GET /v1/tasks/{id}/events`` (Server-Sent Events), on the real stack; and the numbered status events the
store writes with every change (``services/task_events.py``)."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis

from devstack.processes import HOST, wait_until
from services.errors import JobError
from services.jobs import out_of_attempts
from services.prefer import wait_preference
from services.store import JobStore
from services.task_events import TaskEvents
from tests.stack import FINAL, ApiServer, Stack, seed_body, with_directive

# A task's call takes this long: long enough to watch it change, shorter than the test stack's
# UPSTREAM_TIMEOUT (2 s). LONG_MS is longer: its task times out and retries (MAX_ATTEMPTS 3), and stays
# unfinished for about 6 s, then fails; tests that use it cancel it.
SLOW_MS = "1200"
LONG_MS = "30000"


def post(stack: Stack, body: dict[str, Any], prefer: str | None, timeout: float = 70) -> httpx.Response:
    headers = {"Prefer": prefer} if prefer is not None else {}
    return stack.http.post(
        f"{stack.api_url}/v1/images/generations", json=body, headers=headers, timeout=timeout
    )


def get(stack: Stack, task_id: str, prefer: str, timeout: float = 70) -> httpx.Response:
    return stack.http.get(f"{stack.api_url}/v1/tasks/{task_id}", headers={"Prefer": prefer}, timeout=timeout)


def cancel(stack: Stack, task_id: str) -> None:
    """Free the worker's slot a slow task holds (its call is cut off); it may be final already."""
    stack.http.post(f"{stack.api_url}/v1/tasks/{task_id}/cancel")


# Prefer: wait ---------------------------------------------------------------------------------------------
def test_prefer_wait_on_submit_answers_201_with_the_final_task(stack: Stack) -> None:
    started = time.monotonic()
    response = post(stack, with_directive(delay_ms="800"), "wait=30")
    assert response.status_code == 201, response.text
    assert response.headers["Preference-Applied"] == "wait=30"
    assert "Prefer" in response.headers["Vary"]
    task = response.json()
    assert task["status"] == "succeeded" and response.headers["Location"] == task["links"]["self"]
    [output] = task["outputs"]
    assert output["url"].startswith("http") and output["mime_type"] == "image/png"
    assert 0.8 <= time.monotonic() - started < 10, "held until the task was final, not longer"
    assert stack.task(task["id"])["status"] == "succeeded"


def test_prefer_wait_on_get_answers_200_once_final(stack: Stack) -> None:
    task_id = stack.submit(with_directive(delay_ms=SLOW_MS)).json()["id"]
    response = get(stack, task_id, "wait=30")
    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "wait=30"
    assert response.json()["status"] == "succeeded" and response.json()["outputs"]
    # A final task is answered at once.
    started = time.monotonic()
    again = get(stack, task_id, "wait=30")
    assert again.json()["status"] == "succeeded" and time.monotonic() - started < 1


def test_a_wait_shorter_than_the_task_answers_as_usual_after_it(stack: Stack) -> None:
    body = with_directive(delay_ms=LONG_MS)
    started = time.monotonic()
    response = post(stack, body, "respond-async, wait=1")
    held = time.monotonic() - started
    try:
        assert response.status_code == 202, response.text
        assert response.headers["Preference-Applied"] == "wait=1"
        task = response.json()
        assert (
            task["status"] in ("queued", "running") and task["links"]["self"] == response.headers["Location"]
        )
        assert 1 <= held < 3, held
        started = time.monotonic()
        polled = get(stack, task["id"], "wait=1")
        assert polled.status_code == 200 and polled.json()["status"] in ("queued", "running")
        assert polled.headers["Preference-Applied"] == "wait=1"
        assert 1 <= time.monotonic() - started < 3
    finally:
        cancel(stack, response.json()["id"])


@pytest.mark.parametrize(
    ("prefer", "applied"), [("wait=600", "wait=60"), ("wait", "wait=60"), ('WAIT="7"', "wait=7")]
)
def test_a_wait_longer_than_60_seconds_is_capped(stack: Stack, prefer: str, applied: str) -> None:
    response = post(stack, seed_body(), prefer)
    assert response.status_code == 201 and response.headers["Preference-Applied"] == applied


@pytest.mark.parametrize("prefer", ["wait=abc", "wait=-1", "wait=0", "return=minimal", "wait=1.5"])
def test_an_unusable_wait_is_ignored(stack: Stack, prefer: str) -> None:
    response = post(stack, with_directive(delay_ms=SLOW_MS), prefer)
    assert response.status_code == 202 and "Preference-Applied" not in response.headers
    assert set(response.json()) == {"id", "status", "created_at", "links"}, "the usual answer"


def test_prefer_header_parsing() -> None:
    assert wait_preference(["respond-async, wait=5"], maximum=60) == 5
    assert wait_preference(["handling=lenient", "wait=5;foo=bar"], maximum=60) == 5
    assert wait_preference([" wait = 7 "], maximum=60) == 7
    assert wait_preference(["wait=5, wait=9"], maximum=60) == 5, "the first one counts"
    assert wait_preference(["wait=61"], maximum=60) == 60
    assert wait_preference(["waiting=5", "return=representation"], maximum=60) is None
    assert wait_preference(["wait=٣"], maximum=60) is None, "ASCII digits only"
    assert wait_preference(["wait=0"], maximum=60) is None, "no wait: the usual answer"
    assert wait_preference(['wait="00", wait=5'], maximum=60) is None, "the first one counts"
    assert wait_preference(["wait=" + "9" * 5000], maximum=60) == 60, "longer than int() takes"
    assert wait_preference(["wait=0060", "wait=007"], maximum=60) == 60


def raw_request(stack: Stack, path: str, headers: dict[str, str]) -> socket.socket:
    """A GET sent on a socket of our own, so that the test can hang up mid-answer."""
    sock = socket.create_connection((HOST, stack.api.port), timeout=10)  # type: ignore[union-attr]
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {HOST}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def test_a_client_that_hangs_up_mid_wait_leaves_nothing_behind(stack: Stack) -> None:
    events = stack.runtime.task_events
    channel = stack.runtime.keys.task_events
    task_id = stack.submit(with_directive(delay_ms=LONG_MS)).json()["id"]
    try:
        get(stack, task_id, "wait=1")  # the process's subscription is up from here on
        subscribers = stack.runtime.redis.pubsub_numsub(channel)[0][1]
        subscriptions = events.subscriptions
        assert events.waiting == 0
        sockets = [raw_request(stack, f"/v1/tasks/{task_id}", {"Prefer": "wait=60"}) for _ in range(10)]
        sockets += [raw_request(stack, f"/v1/tasks/{task_id}/events", {}) for _ in range(10)]
        wait_until(lambda: events.waiting == 20, timeout=10, what="20 requests waiting")
        assert stack.runtime.redis.pubsub_numsub(channel)[0][1] == subscribers, "no subscription per waiter"
        hung_up = time.monotonic()
        for sock in sockets:
            sock.close()
        wait_until(lambda: events.waiting == 0, timeout=5, what="the waiters to go")
        print(f"20 waiters gone {time.monotonic() - hung_up:.2f}s after their clients hung up")
        assert stack.runtime.redis.pubsub_numsub(channel)[0][1] == subscribers
        assert events.subscriptions == subscriptions, "the one subscription stayed"
        assert stack.task(task_id)["status"] not in FINAL, "they went because their clients did"
    finally:
        cancel(stack, task_id)


# the event stream -------------------------------------------------------------------------------------
@contextmanager
def event_stream(
    url: str, task_id: str, headers: dict[str, str] | None = None
) -> Iterator[Iterator[dict[str, Any]]]:
    """The stream's messages, each {"id", "event", "data"} or {"comment"}; ends when the server ends it."""
    with httpx.Client(timeout=httpx.Timeout(10, read=30)) as client:
        with client.stream("GET", f"{url}/v1/tasks/{task_id}/events", headers=headers or {}) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            yield _messages(response.iter_lines())


def _messages(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    message: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if message:
                yield message
            message = {}
        elif line.startswith(":"):
            message["comment"] = line[1:].strip()
        else:
            field, _, value = line.partition(": ")
            message[field] = json.loads(value) if field == "data" else value
    if message:
        yield message


def events_of(messages: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [message for message in messages if "comment" not in message]


def test_events_stream_each_status_in_order_and_end_after_the_final_one(stack: Stack) -> None:
    task_id = stack.submit(with_directive(delay_ms=SLOW_MS)).json()["id"]
    started = time.monotonic()
    with event_stream(stack.api_url, task_id) as messages:
        events = events_of(messages)  # to its end: the server closes the stream after the final event
    assert [(event["id"], event["event"]) for event in events] == [
        ("1", "queued"),
        ("2", "running"),
        ("3", "succeeded"),
    ]
    assert time.monotonic() - started < 10
    assert all(event["data"]["id"] == task_id for event in events)
    final = events[-1]["data"]
    assert final["status"] == "succeeded" and final["outputs"][0]["url"].startswith("http")
    assert final == {**stack.task(task_id), "outputs": final["outputs"]}, "the task as GET shows it"
    assert events[1]["data"]["status"] in ("running", "succeeded")


def test_last_event_id_resumes_without_gaps_or_repeats(stack: Stack) -> None:
    task_id = stack.submit(with_directive(delay_ms=SLOW_MS)).json()["id"]
    with event_stream(stack.api_url, task_id) as messages:
        first = next(message for message in messages if "id" in message)
    assert (first["id"], first["event"]) == ("1", "queued")
    # The client was away while the task started (and maybe finished): the rest is replayed, then live.
    wait_until(lambda: stack.task(task_id)["status"] != "queued", timeout=10, what="the task to start")
    with event_stream(stack.api_url, task_id, {"Last-Event-ID": "1"}) as messages:
        rest = events_of(messages)
    assert [(event["id"], event["event"]) for event in rest] == [("2", "running"), ("3", "succeeded")]
    # Resumed after the final event: nothing more, and the stream ends at once.
    with event_stream(stack.api_url, task_id, {"Last-Event-ID": "3"}) as messages:
        assert events_of(messages) == []
    with event_stream(stack.api_url, task_id, {"Last-Event-ID": "2"}) as messages:
        assert [event["id"] for event in events_of(messages)] == ["3"]


def test_a_retried_task_streams_every_change(stack: Stack) -> None:
    body = with_directive(script="500,ok")
    task_id = stack.submit(body).json()["id"]
    with event_stream(stack.api_url, task_id) as messages:
        events = events_of(messages)
    statuses = [event["event"] for event in events]
    assert [event["id"] for event in events] == [str(number) for number in range(1, len(events) + 1)]
    assert statuses[-1] == "succeeded" and statuses.count("running") == 2, statuses


def test_an_idle_stream_gets_heartbeats(stack: Stack) -> None:
    api = ApiServer(dataclasses.replace(stack.config, events_heartbeat=0.3))
    task_id = stack.submit(with_directive(delay_ms=LONG_MS)).json()["id"]
    try:
        started = time.monotonic()
        with event_stream(api.url, task_id, {"Last-Event-ID": "1"}) as messages:
            seen: list[dict[str, Any]] = []
            for message in messages:
                seen.append(message)
                if sum("comment" in item for item in seen) >= 4:
                    break
        assert time.monotonic() - started < 3, "a heartbeat every 0.3 s"
        ids = [int(item["id"]) for item in seen if "id" in item]
        assert ids == sorted(ids) and all(number > 1 for number in ids), "event 1 is not sent again"
    finally:
        api.stop()
        cancel(stack, task_id)


def test_another_tenants_task_is_not_found(stack: Stack) -> None:
    task_id = stack.submit(seed_body()).json()["id"]
    api = ApiServer(dataclasses.replace(stack.config, api_keys=(("other-tenant", "other-key"),)))
    headers = {"Authorization": "Bearer other-key"}
    try:
        streamed = stack.http.get(f"{api.url}/v1/tasks/{task_id}/events", headers=headers)
        assert streamed.status_code == 404 and streamed.json()["error"]["code"] == "not_found"
        waited = stack.http.get(f"{api.url}/v1/tasks/{task_id}", headers={**headers, "Prefer": "wait=5"})
        assert waited.status_code == 404
        assert stack.http.get(f"{api.url}/v1/tasks/{task_id}/events").status_code == 401
    finally:
        api.stop()


def test_a_bad_last_event_id_is_refused(stack: Stack) -> None:
    task_id = stack.submit(seed_body()).json()["id"]
    response = stack.http.get(f"{stack.api_url}/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "x"})
    assert response.status_code == 400 and response.json()["error"]["field"] == "Last-Event-ID"
    missing = stack.http.get(f"{stack.api_url}/v1/tasks/no-such-task/events")
    assert missing.status_code == 404


def test_a_last_event_id_beyond_the_tasks_last_event_is_refused(stack: Stack) -> None:
    """Events are numbered in order as they happen, so an id past the task's last event is no event this
    stream sent, whether the task is final or not: the same 400 as a malformed one, not an empty stream."""
    events = f"{stack.api_url}/v1/tasks/{{}}/events"
    done = stack.run(seed_body())["id"]  # events 1 to 3: queued, running, succeeded
    slow = stack.submit(with_directive(delay_ms=LONG_MS)).json()["id"]
    try:
        malformed = stack.http.get(events.format(done), headers={"Last-Event-ID": "x"}).json()
        for task_id, beyond in ((done, "4"), (done, "99"), (slow, "99")):
            response = stack.http.get(events.format(task_id), headers={"Last-Event-ID": beyond})
            assert response.status_code == 400, (beyond, response.text)
            assert response.json() == malformed
    finally:
        cancel(stack, slow)


# the store's events -----------------------------------------------------------------------------------
def test_the_store_numbers_each_change_of_status(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, prefix="events-test", task_retention=86400)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.keys.task_events)
    task_id = store.create(model="m", payload=b"{}", metadata=None)["id"]
    give_up = out_of_attempts(5)

    def events() -> list[str]:
        return [status.decode() for status in redis_client.lrange(store.keys.events(task_id), 0, -1)]

    assert events() == ["queued"]
    attempt = store.start_attempt(task_id, worker="w", lease_seconds=30, give_up=give_up)
    assert attempt is not None
    store.schedule_retry(attempt.lease, JobError("x", retryable=True), delay=0)
    store.postpone(task_id, delay=1, hold_seconds=60, error=JobError("y"))  # no change of status
    redis_client.zadd(store.keys.delayed, {task_id: 0}, xx=True)  # due now
    assert store.claim_due_retries() == [task_id]
    attempt = store.start_attempt(task_id, worker="w", lease_seconds=30, give_up=give_up)
    assert attempt is not None
    store.succeed(attempt.lease, outputs=[], text=[], usage=None, upstream_status=200)
    assert events() == ["queued", "running", "queued", "running", "succeeded"]
    assert 86400 - 5 <= redis_client.ttl(store.keys.events(task_id)) <= 86400, "kept like the task"
    published: list[str] = []
    deadline = time.monotonic() + 5
    while len(published) < 4 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)  # None for the subscription's confirmation
        if message is not None:
            published.append(message["data"].decode())
    assert published == [task_id] * 4, "one wake-up per change of status after the create"
    store.delete(task_id)
    assert not redis_client.exists(store.keys.events(task_id))
    pubsub.close()


def finish(store: JobStore, task_id: str) -> None:
    attempt = store.start_attempt(task_id, worker="w", lease_seconds=30, give_up=out_of_attempts(5))
    assert attempt is not None
    store.succeed(attempt.lease, outputs=[], text=[], usage=None, upstream_status=200)


def waiting_in_a_thread(events: TaskEvents, task_id: str) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def wait() -> None:
        result["task"] = events.wait_final(task_id, tenant="default", timeout=20, connected=lambda: True)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    wait_until(lambda: events.waiting == 1, timeout=5, what="the waiter")
    return thread, result


def test_a_waiter_still_sees_the_change_when_the_subscription_is_lost(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, prefix="events-lost")
    events = TaskEvents(redis_client, store.keys, store, idle=0.3)
    task_id = store.create(model="m", payload=b"{}", metadata=None)["id"]
    thread, result = waiting_in_a_thread(events, task_id)
    # the listener subscribes on its own thread, a moment after the first waiter registers
    wait_until(lambda: events.subscriptions == 1, timeout=5, what="the subscription")
    redis_client.client_kill_filter(_type="pubsub")  # the published change may be lost now
    finish(store, task_id)
    thread.join(10)
    assert result["task"]["status"] == "succeeded", "read from the store: a poll, or woken on resubscribing"
    wait_until(lambda: events.subscriptions == 2, timeout=10, what="the subscription to be made again")


def test_a_process_without_waiters_drops_its_subscription(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, prefix="events-idle")
    events = TaskEvents(redis_client, store.keys, store, idle=0.3)
    channel = store.keys.task_events
    task_id = store.create(model="m", payload=b"{}", metadata=None)["id"]
    thread, result = waiting_in_a_thread(events, task_id)
    wait_until(lambda: redis_client.pubsub_numsub(channel)[0][1] == 1, timeout=5, what="the subscription")
    finish(store, task_id)
    thread.join(10)
    assert result["task"]["status"] == "succeeded" and events.waiting == 0
    wait_until(lambda: redis_client.pubsub_numsub(channel)[0][1] == 0, timeout=5, what="the unsubscription")
    second = store.create(model="m", payload=b"{}", metadata=None)["id"]
    thread, result = waiting_in_a_thread(events, second)  # a new waiter subscribes again
    finish(store, second)
    thread.join(10)
    assert result["task"]["status"] == "succeeded" and events.subscriptions == 2


def test_the_sdk_follows_the_servers_own_event_stream(stack: Stack) -> None:
    """The SDK (``client/``) finds ``/events`` in the OpenAPI document and waits on the stream."""
    from imagegen import Client

    with Client(stack.api_url) as client:
        task = client.generate(f"[sim key={uuid.uuid4().hex} delay_ms={SLOW_MS}] a fox")
        seen: list[str] = []
        final = client.wait(task.id, timeout=30, on_update=lambda update: seen.append(update.status.value))
    assert final.succeeded and final.outputs and seen[-1] == "succeeded", seen
