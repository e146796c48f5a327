"""Webhooks on the real stack: a real receiver verifies every signature with ``standardwebhooks``.

Delivered once per event; retried on 5xx with the same ``webhook-id``; ``Retry-After`` honoured; given up
after the (short, test) schedule and redelivered on request; delivered after the webhook worker was
SIGKILLed mid-delivery; 410 stops; private addresses refused, at submit and where we connect.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from standardwebhooks import Webhook

from api import create_app
from devstack.processes import free_port, wait_until
from services.config import load_config
from services.errors import ConfigError
from services.jobs import out_of_attempts
from services.keys import Keys
from services.netguard import forbidden_reason
from services.retry_after import parse_retry_after
from services.storage import Storage
from services.store import JobStore
from services.webhook_signing import generate_secret, sign
from services.webhooks.dispatcher import WebhookDispatcher
from services.webhooks.outbox import WebhookOutbox
from services.webhooks.sender import WebhookSender
from services.webhooks.service import WebhookService
from tests.receiver import HOLD, Receiver, Response
from tests.stack import Stack, running_stack, seed_body, with_directive


@pytest.fixture(scope="module")
def receiver(stack: Stack) -> Iterator[Receiver]:
    running = Receiver(stack.env["WEBHOOK_SIGNING_SECRET"])
    yield running
    running.stop()


def new_path() -> str:
    return f"/hooks/{uuid.uuid4().hex[:12]}"


def submit(stack: Stack, url: str, events: list[str] | None = None, body: dict | None = None) -> str:
    body = {**(body or seed_body()), "webhook_url": url}
    if events is not None:
        body["webhook_events"] = events
    response = stack.submit(body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def deliveries(stack: Stack, task_id: str) -> list[dict[str, Any]]:
    return stack.task(task_id)["webhook"]["deliveries"]


def wait_log(
    stack: Stack, task_id: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 20
) -> list[dict[str, Any]]:
    try:
        wait_until(lambda: done(deliveries(stack, task_id)), timeout=timeout, what="the delivery log")
    except TimeoutError:
        raise AssertionError(f"delivery log: {deliveries(stack, task_id)}\n{stack.logs()}") from None
    return deliveries(stack, task_id)


def outcomes(log: list[dict[str, Any]]) -> list[str]:
    return [entry["outcome"] for entry in log]


def pending(stack: Stack, event_id: str) -> bool:
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        return client.zscore(f"{stack.config.key_prefix}:wh:due", event_id) is not None
    finally:
        client.close()


def assert_verified(requests: list) -> None:
    errors = [item.verify_error for item in requests]
    assert requests and errors == [None] * len(requests), errors


# --------------------------------------------------------------------------------------------------
# on the shared stack
# --------------------------------------------------------------------------------------------------


def test_each_event_is_delivered_once_signed_with_the_task_as_get_shows_it(
    stack: Stack, receiver: Receiver
) -> None:
    path = new_path()
    task_id = submit(stack, receiver.url(path), ["running", "succeeded"])
    log = wait_log(stack, task_id, lambda log: outcomes(log) == ["delivered", "delivered"])
    requests = receiver.at(path)
    assert len(requests) == 2
    assert_verified(requests)
    running, succeeded = sorted(requests, key=lambda item: item.payload["type"] != "task.running")
    assert running.webhook_id == f"msg_{task_id}_running" and running.payload["type"] == "task.running"
    assert succeeded.webhook_id == f"msg_{task_id}_succeeded"
    assert succeeded.headers["content-type"] == "application/json"
    assert int(succeeded.headers["webhook-timestamp"]) == pytest.approx(succeeded.arrived, abs=5)
    assert succeeded.headers["webhook-signature"].startswith("v1,")

    payload = succeeded.payload
    assert set(payload) == {"type", "timestamp", "data"} and payload["type"] == "task.succeeded"
    data, shown = payload["data"], stack.task(task_id)
    assert data["status"] == "succeeded" and running.payload["data"]["status"] == "running"

    def comparable(view: dict[str, Any]) -> dict[str, Any]:
        outputs = [{k: v for k, v in output.items() if k != "url"} for output in view["outputs"]]
        webhook = {k: v for k, v in view["webhook"].items() if k != "deliveries"}
        return {**view, "outputs": outputs, "webhook": webhook, "links": None}

    assert comparable(data) == comparable(shown)
    assert data["webhook"]["url"] == receiver.url(path)
    assert all(entry in log for entry in data["webhook"]["deliveries"]), "the log as it was then"
    assert data["links"]["self"].endswith(f"/v1/tasks/{task_id}")
    assert stack.http.get(data["outputs"][0]["url"]).status_code == 200, "a freshly signed output URL"
    assert len(succeeded.body) < 8192, "outputs as URLs, never image bytes"

    assert {entry["webhook_id"] for entry in log} == {running.webhook_id, succeeded.webhook_id}
    for entry in log:
        assert entry["attempt"] == 1 and entry["status_code"] == 200 and entry["error"] is None
        assert entry["next_retry_at"] is None and entry["duration_ms"] >= 0 and entry["attempted_at"]
    assert not pending(stack, succeeded.webhook_id)
    assert len(receiver.at(path)) == 2


def test_default_events_are_the_final_ones(stack: Stack, receiver: Receiver) -> None:
    ok_path, failed_path = new_path(), new_path()
    ok_id = submit(stack, receiver.url(ok_path))
    failed_id = submit(stack, receiver.url(failed_path), body=with_directive(script="400"))
    wait_log(stack, ok_id, lambda log: outcomes(log) == ["delivered"])
    wait_log(stack, failed_id, lambda log: outcomes(log) == ["delivered"])
    [ok], [failed] = receiver.at(ok_path), receiver.at(failed_path)
    assert_verified([ok, failed])
    assert ok.payload["type"] == "task.succeeded"
    assert failed.payload["type"] == "task.failed"
    assert failed.payload["data"]["error"]["code"] == "upstream_rejected"
    assert stack.task(failed_id)["webhook"]["events"] == ["succeeded", "failed", "canceled"]


def test_a_task_without_webhook_shows_none(stack: Stack) -> None:
    assert stack.run(seed_body())["webhook"] is None


def test_503_twice_then_200_is_delivered_on_the_third_try_with_the_same_id(
    stack: Stack, receiver: Receiver
) -> None:
    path = new_path()
    receiver.script(path, [503, 503, 200])
    task_id = submit(stack, receiver.url(path))
    log = wait_log(stack, task_id, lambda log: "delivered" in outcomes(log))
    requests = receiver.at(path)
    assert len(requests) == 3
    assert_verified(requests)
    assert len({item.webhook_id for item in requests}) == 1
    assert [entry["attempt"] for entry in log] == [1, 2, 3]
    assert [entry["status_code"] for entry in log] == [503, 503, 200]
    assert outcomes(log) == ["failed", "failed", "delivered"]
    assert all(entry["next_retry_at"] for entry in log[:2]) and log[2]["next_retry_at"] is None
    # the schedule (0, 0.2, 0.4 s here, with ±10 % jitter) spaces the attempts
    assert requests[1].arrived - requests[0].arrived >= 0.15
    assert requests[2].arrived - requests[1].arrived >= 0.3
    assert stack.task(task_id)["status"] == "succeeded"


def test_retry_after_is_honoured(stack: Stack, receiver: Receiver) -> None:
    path = new_path()
    receiver.script(path, [Response(429, {"Retry-After": "1"}), 200])
    task_id = submit(stack, receiver.url(path))
    log = wait_log(stack, task_id, lambda log: "delivered" in outcomes(log))
    first, second = receiver.at(path)
    assert second.arrived - first.arrived >= 0.95, "Retry-After: 1 beats the schedule's 0.2 s"
    assert [entry["status_code"] for entry in log] == [429, 200]


def test_a_receiver_down_for_the_whole_schedule_is_given_up_then_redelivered(
    stack: Stack, receiver: Receiver
) -> None:
    port = free_port()  # nothing listens there yet
    url = f"http://127.0.0.1:{port}/down"
    task_id = submit(stack, url)
    log = wait_log(stack, task_id, lambda log: "given_up" in outcomes(log))
    assert outcomes(log) == ["failed", "failed", "given_up"]
    # the class of the error, never the library's text (which names our side's address)
    assert all(entry["status_code"] is None for entry in log)
    assert {entry["error"] for entry in log} == {"connection failed (ConnectError)"}
    assert log[-1]["next_retry_at"] is None
    event_id = log[0]["webhook_id"]
    assert not pending(stack, event_id)
    assert stack.task(task_id)["status"] == "succeeded", "a webhook failure never changes the task"

    late = Receiver(stack.env["WEBHOOK_SIGNING_SECRET"], port=port)
    try:
        response = stack.http.post(f"{stack.api_url}/v1/tasks/{task_id}/webhook/redeliver")
        assert response.status_code == 202, response.text
        assert response.json() == {
            "task_id": task_id,
            "webhook_id": event_id,
            "event": "task.succeeded",
            "status": "pending",
        }
        log = wait_log(stack, task_id, lambda log: "delivered" in outcomes(log))
        [request] = late.at("/down")
        assert_verified([request])
        assert request.webhook_id == event_id
        assert outcomes(log) == ["failed", "failed", "given_up", "delivered"] and log[-1]["attempt"] == 4
    finally:
        late.stop()


def test_410_gone_stops_retrying(stack: Stack, receiver: Receiver) -> None:
    path = new_path()
    receiver.script(path, [410, 200])
    task_id = submit(stack, receiver.url(path))
    [entry] = wait_log(stack, task_id, lambda log: outcomes(log) == ["gone"])
    assert entry["status_code"] == 410 and entry["next_retry_at"] is None
    assert not pending(stack, entry["webhook_id"])
    assert len(receiver.at(path)) == 1


def test_redeliver_of_a_delivered_event_sends_it_again(stack: Stack, receiver: Receiver) -> None:
    path = new_path()
    task_id = submit(stack, receiver.url(path), ["running", "succeeded"])
    wait_log(stack, task_id, lambda log: outcomes(log) == ["delivered", "delivered"])
    response = stack.http.post(f"{stack.api_url}/v1/tasks/{task_id}/webhook/redeliver")
    assert response.status_code == 202 and response.json()["event"] == "task.succeeded"
    log = wait_log(stack, task_id, lambda log: len(log) == 3 and log[-1]["outcome"] == "delivered")
    assert log[-1]["webhook_id"] == f"msg_{task_id}_succeeded" and log[-1]["attempt"] == 2
    requests = receiver.at(path)
    assert_verified(requests)
    assert [item.webhook_id for item in requests].count(f"msg_{task_id}_succeeded") == 2


def test_redeliver_needs_a_task_with_a_webhook_event(stack: Stack) -> None:
    api = stack.api_url
    missing = stack.http.post(f"{api}/v1/tasks/{uuid.uuid4()}/webhook/redeliver")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    plain = stack.run(seed_body())
    conflict = stack.http.post(f"{api}/v1/tasks/{plain['id']}/webhook/redeliver")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "no_webhook"


def test_a_worker_killed_during_a_delivery_still_delivers(stack: Stack, receiver: Receiver) -> None:
    path = new_path()
    receiver.script(path, [HOLD, 200])
    task_id = submit(stack, receiver.url(path))
    receiver.wait_for(path, 1)  # the first attempt is in flight, held open by the receiver
    worker = stack.children["webhook-worker"]
    worker.kill()
    receiver.release()
    # the stack's supervisor restarts it, as a process manager would; without one, restart it here
    try:
        wait_until(worker.alive, timeout=2, what="the webhook worker to be restarted")
    except TimeoutError:
        worker.start()
    # the killed attempt's lease (WEBHOOK_LEASE_SECONDS=5) expires, and the new worker claims it again
    log = wait_log(stack, task_id, lambda log: "delivered" in outcomes(log), timeout=30)
    first, second = receiver.at(path)
    assert_verified([first, second])
    assert first.webhook_id == second.webhook_id == f"msg_{task_id}_succeeded"
    assert first.payload["type"] == second.payload["type"] == "task.succeeded"
    [entry] = log  # the killed attempt never finished, so it has no entry, but it counts
    assert entry["attempt"] == 2 and entry["outcome"] == "delivered"


def test_a_pending_delivery_survives_a_redis_restart(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Delivery state lives in Redis (AOF), not in a Celery countdown: restart Redis between retries."""
    schedule = ",".join(["0"] + ["0.5"] * 40)
    with running_stack(tmp_path_factory.mktemp("wh-redis"), WEBHOOK_RETRY_SCHEDULE=schedule) as stack:
        receiver = Receiver(stack.env["WEBHOOK_SIGNING_SECRET"])
        try:
            path = new_path()
            receiver.script(path, [503])
            task_id = submit(stack, receiver.url(path))
            wait_log(stack, task_id, lambda log: len(log) >= 2)
            stack.children["redis"].stop()  # SIGTERM: Redis writes its AOF and exits
            stack.start_redis()  # the same port and data
            receiver.script(path, [200])
            log = wait_log(stack, task_id, lambda log: "delivered" in outcomes(log), timeout=40)
            assert set(outcomes(log)) == {"failed", "delivered"}
            requests = receiver.at(path)
            assert_verified(requests)
            assert {item.webhook_id for item in requests} == {f"msg_{task_id}_succeeded"}
        finally:
            receiver.stop()


# --------------------------------------------------------------------------------------------------
# where we refuse to deliver
# --------------------------------------------------------------------------------------------------


def test_a_host_name_resolving_to_loopback_is_refused_where_we_connect(
    stack: Stack, receiver: Receiver
) -> None:
    """WEBHOOK_ALLOW_PRIVATE unset: ``localhost`` resolves to 127.0.0.1, so nothing is sent."""
    env = {**stack.env, "WEBHOOK_ALLOW_PRIVATE": "", "KEY_PREFIX": f"wh-{uuid.uuid4().hex[:8]}"}
    config = load_config(env)
    assert not config.webhook_allow_private
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    store = JobStore(client, config.key_prefix)
    storage = Storage(config)
    path = new_path()
    webhook = {"url": f"http://localhost:{receiver.port}{path}", "events": ["succeeded"]}
    task = store.create(model="m", payload=b"{}", metadata=None, webhook=webhook)
    attempt = store.start_attempt(task["id"], worker="w", lease_seconds=30, give_up=out_of_attempts(1))
    assert attempt is not None
    task = store.succeed(attempt.lease, outputs=[], text=[], usage=None, upstream_status=200)

    guarded = WebhookService(config, storage, client, store.keys)
    [(event_id, claim)] = guarded.outbox.claim_due(lease_seconds=30)
    assert guarded.deliver(event_id, claim) == "refused"
    [entry] = guarded.outbox.deliveries(task["id"])
    assert entry["outcome"] == "refused" and entry["next_retry_at"] is None
    assert entry["error"] == "refused: the receiver's address is not allowed (loopback)", "no address shown"
    assert not guarded.outbox.is_pending(event_id)
    assert receiver.at(path) == []

    # the same event, redelivered by code that allows private addresses, arrives: it was the guard
    allowing = WebhookService(replace(config, webhook_allow_private=True), storage, client, store.keys)
    allowing.redeliver(task)
    [(event_id, claim)] = allowing.outbox.claim_due(lease_seconds=30)
    assert allowing.deliver(event_id, claim) == "delivered"
    assert_verified(receiver.wait_for(path, 1))
    guarded.close()
    allowing.close()
    client.close()


def test_the_dispatcher_claims_only_while_the_queue_has_room(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    store = JobStore(client, f"wh-{uuid.uuid4().hex[:8]}")
    config = stack.config
    outbox = WebhookService(config, Storage(config), client, store.keys).outbox
    for _ in range(3):
        task = store.create(
            model="m",
            payload=b"{}",
            metadata=None,
            webhook={"url": "https://h/", "events": ["canceled", "running"]},
        )
        store.start_attempt(task["id"], worker="w", lease_seconds=30, give_up=out_of_attempts(1))
    backlog = [10]
    sent: list[tuple[str, str]] = []
    dispatcher = WebhookDispatcher(
        outbox,
        lambda *item: sent.append(item),
        lambda: backlog[0],
        lease_seconds=30,
        interval=1,
        max_backlog=10,
    )
    assert dispatcher.tick() == 0 and sent == []
    backlog[0] = 8
    assert dispatcher.tick() == 2 and len(sent) == 2
    backlog[0] = 0
    assert dispatcher.tick() == 1 and dispatcher.tick() == 0, "claimed events are leased"
    assert len({event for event, _ in sent}) == 3 and len({claim for _, claim in sent}) == 3
    client.close()


def fake_resolver(addresses: dict[str, list[str]]) -> Callable[..., list[tuple[Any, ...]]]:
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses[host]]

    return resolve


def test_we_connect_to_the_address_we_checked_and_keep_the_host_name(
    stack: Stack, receiver: Receiver
) -> None:
    config = replace(stack.config, webhook_allow_private=True)
    path = new_path()
    sender = WebhookSender(config, resolver=fake_resolver({"hooks.example.test": ["127.0.0.1"]}))
    try:
        result = sender.send(
            f"http://hooks.example.test:{receiver.port}{path}",
            "msg_x",
            b"{}",
            [stack.env["WEBHOOK_SIGNING_SECRET"]],
        )
    finally:
        sender.close()
    assert result.delivered, result
    [request] = receiver.at(path)
    assert request.headers["host"] == f"hooks.example.test:{receiver.port}"
    assert_verified([request])


@pytest.mark.parametrize(
    ("addresses", "allow_private", "reason"),
    [
        (["10.0.0.7"], False, "private"),
        (["93.184.215.14", "192.168.1.9"], False, "private"),  # any refused address refuses the host
        (["169.254.169.254"], True, "metadata service"),  # refused even when private is allowed
        (["fd00::5"], False, "private"),
        (["127.0.0.2"], False, "loopback"),
    ],
)
def test_resolved_addresses_are_checked_before_connecting(
    addresses: list[str], allow_private: bool, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = replace(
        load_config({"WEBHOOK_SIGNING_SECRET": generate_secret()}),
        webhook_allow_private=allow_private,
        webhook_allow_http=True,
    )
    sender = WebhookSender(config, resolver=fake_resolver({"hooks.example.test": addresses}))
    try:
        result = sender.send("http://hooks.example.test/x", "msg_x", b"{}", [generate_secret()])
    finally:
        sender.close()
    assert result.refused and result.status_code is None
    # the client sees why, not the address the receiver's host resolves to; the log has it
    assert result.error == f"refused: the receiver's address is not allowed ({reason})"
    assert addresses[-1] in caplog.text


def test_a_receiver_that_trickles_its_answer_times_out_as_a_whole() -> None:
    """httpx's timeouts are per socket read: a byte every 0.2 s would never trip a 0.5 s read timeout."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * 100:
                if stop.wait(0.2):
                    return
                connection.sendall(bytes([byte]))

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    config = replace(
        load_config({"WEBHOOK_SIGNING_SECRET": generate_secret(), "WEBHOOK_TIMEOUT": "0.5"}),
        webhook_allow_private=True,
        webhook_allow_http=True,
    )
    sender = WebhookSender(config)
    try:
        result = sender.send(
            f"http://127.0.0.1:{server.getsockname()[1]}/slow", "msg_x", b"{}", [generate_secret()]
        )
    finally:
        stop.set()
        sender.close()
        server.close()
        thread.join(5)
    assert result.status_code is None and result.error.startswith("timeout"), result
    assert 900 <= result.duration_ms < 2000, "the whole request within 2 x WEBHOOK_TIMEOUT"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("fd12::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "metadata service"),
        ("fd00:ec2::254", "metadata service"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not globally routable"),
        ("::ffff:127.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_classes(address: str, reason: str | None) -> None:
    import ipaddress

    assert forbidden_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    ("url", "env", "code"),
    [
        ("https://127.0.0.1/h", {}, "invalid_field"),
        ("https://[::1]:8443/h", {}, "invalid_field"),
        ("https://10.0.0.1/h", {}, "invalid_field"),
        ("https://169.254.169.254/latest", {"WEBHOOK_ALLOW_PRIVATE": "true"}, "invalid_field"),
        ("https://localhost/h", {}, "invalid_field"),
        ("http://hooks.example.com/h", {}, "invalid_field"),  # plain http needs WEBHOOK_ALLOW_HTTP
    ],
)
def test_submit_refuses_what_we_would_never_deliver(
    stack: Stack, url: str, env: dict[str, str], code: str
) -> None:
    base = {**stack.env, "WEBHOOK_ALLOW_PRIVATE": "", "WEBHOOK_ALLOW_HTTP": ""}
    client = create_app(load_config({**base, **env})).test_client()
    response = client.post("/v1/images/generations", json={**seed_body(), "webhook_url": url})
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert (error["code"], error["field"]) == (code, "webhook_url")


# --------------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------------


def test_our_signature_is_the_reference_implementations() -> None:
    secret = generate_secret()
    body = b'{"type":"task.succeeded","data":{"id":"x"}}'
    when = datetime.now(UTC)
    ours = sign(secret, "msg_1", int(when.timestamp()), body)
    assert ours == Webhook(secret).sign("msg_1", when, body.decode())
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32


def test_retry_after_values() -> None:
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    later = datetime.fromtimestamp(datetime.now(UTC).timestamp() + 60, UTC)
    assert 55 < parse_retry_after(later.strftime("%a, %d %b %Y %H:%M:%S GMT")) <= 60


def test_webhook_configuration() -> None:
    config = load_config({})
    assert config.webhook_signing_secret is None and not config.webhook_allow_private
    assert config.webhook_retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    assert config.webhook_timeout == 15 and config.public_base_url == "http://127.0.0.1:8000"
    secret = generate_secret()
    config = load_config({"WEBHOOK_SIGNING_SECRET": secret, "WEBHOOK_RETRY_SCHEDULE": "0, 1.5,60"})
    assert config.webhook_retry_schedule == (0, 1.5, 60) and secret not in repr(config)
    for name, value in [
        ("WEBHOOK_SIGNING_SECRET", "not-a-secret"),
        ("WEBHOOK_SIGNING_SECRET", "whsec_" + base64.b64encode(b"short").decode()),
        ("WEBHOOK_RETRY_SCHEDULE", "5,10"),
        ("WEBHOOK_RETRY_SCHEDULE", "0,-1"),
        ("WEBHOOK_RETRY_SCHEDULE", "0,,1"),
        ("WEBHOOK_ALLOW_PRIVATE", "maybe"),
        ("WEBHOOK_TIMEOUT", "0"),
    ]:
        with pytest.raises(ConfigError, match=name):
            load_config({name: value})
    with pytest.raises(ConfigError, match="WEBHOOK_LEASE_SECONDS"):
        load_config({"WEBHOOK_TIMEOUT": "30", "WEBHOOK_LEASE_SECONDS": "60"})


def test_a_canceled_task_sends_its_canceled_event(stack: Stack, receiver: Receiver) -> None:
    path = new_path()
    task_id = submit(stack, receiver.url(path), ["canceled"], body=with_directive(delay_ms="1500"))
    wait_until(lambda: stack.task(task_id)["status"] == "running", timeout=10, what="the task to run")
    assert stack.http.post(f"{stack.api_url}/v1/tasks/{task_id}/cancel").status_code == 200
    (request,) = receiver.wait_for(path, 1)
    assert_verified([request])
    assert request.webhook_id == f"msg_{task_id}_canceled"
    assert request.payload["type"] == "task.canceled" and request.payload["data"]["status"] == "canceled"


def test_a_done_webhook_event_is_kept_as_long_as_the_task(redis_client: redis.Redis) -> None:
    """The outbox keeps a delivered (or abandoned) event, its state and its log for the retention it is
    given: the service gives it TASK_RETENTION_DAYS (it was a fixed 30 days, whatever the task's)."""
    keys = Keys()
    outbox = WebhookOutbox(redis_client, keys, retention=2 * 86400)
    event_id = f"msg_batch_{'2' * 32}_completed"
    redis_client.set(keys.webhook_event(event_id), json.dumps({"id": event_id}))
    redis_client.zadd(keys.webhooks_due, {event_id: 0})
    [(claimed, claim)] = outbox.claim_due(lease_seconds=5)
    assert outbox.begin(claimed, claim, lease_seconds=5) is not None
    entry = {"webhook_id": event_id, "outcome": "delivered"}
    assert outbox.finish(
        event_id, f"batch_{'2' * 32}", claim, entry, next_due_ms=None, final_status="delivered"
    )
    for key in (
        keys.webhook_event(event_id),
        keys.webhook_state(event_id),
        keys.webhook_log(f"batch_{'2' * 32}"),
    ):
        assert 86400 < redis_client.ttl(key) <= 2 * 86400, key
