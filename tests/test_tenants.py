"""Tenants on the real stack: isolation, keys hashed at rest and revoked everywhere at once, the admin
API, per-tenant webhook secrets (verified with the ``standardwebhooks`` package), each limit's 429,
usage, and fair share of the upstream's slots."""

from __future__ import annotations

import dataclasses
import json
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from devstack.processes import HOST, wait_until
from services import presence
from services.admission import LOW_PRIORITY_AGING, ready_order
from services.clock import epoch_ms, now_ms
from services.queue import GENERATION_QUEUE
from tests.fault_kit import settle_succeeded, slow_bodies
from tests.receiver import Receiver
from tests.stack import ApiServer, Stack, directive_key, seed_body, with_directive

ADMIN_KEY = "test-admin-key-" + uuid.uuid4().hex


class Tenants:
    """An API with two tenants' keys and the admin API, on the session stack; tenant names are fresh
    for each test, so that settings one test sets never reach another."""

    def __init__(self, stack: Stack) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.a, self.b = f"a-{suffix}", f"b-{suffix}"
        self.keys = {self.a: f"key-a-{suffix}", self.b: f"key-b-{suffix}"}
        config = dataclasses.replace(stack.config, api_keys=tuple(self.keys.items()), admin_api_key=ADMIN_KEY)
        self.stack = stack
        self.api = ApiServer(config)
        self.url = self.api.url

    def as_(self, tenant: str | None) -> dict[str, str]:
        key = ADMIN_KEY if tenant == "admin" else self.keys.get(tenant or "", "")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def call(self, method: str, path: str, tenant: str | None, **kwargs: Any) -> httpx.Response:
        return self.stack.http.request(method, f"{self.url}{path}", headers=self.as_(tenant), **kwargs)

    def submit(self, tenant: str, body: dict[str, Any]) -> httpx.Response:
        return self.call("POST", "/v1/images/generations", tenant, json=body)

    def task(self, tenant: str, task_id: str) -> dict[str, Any]:
        response = self.call("GET", f"/v1/tasks/{task_id}", tenant)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_final(self, tenant: str, task_id: str) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            task = self.task(tenant, task_id)
            return task if task["status"] in ("succeeded", "failed", "canceled") else None

        return wait_until(final, timeout=30, what=f"task {task_id} to finish")  # type: ignore[return-value]

    def settings(self, tenant: str, **values: Any) -> None:
        response = self.call("PUT", f"/v1/admin/tenants/{tenant}", "admin", json=values)
        assert response.status_code == 200, response.text


@pytest.fixture
def tenants(stack: Stack) -> Iterator[Tenants]:
    running = Tenants(stack)
    yield running
    running.api.stop()


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    if field is not None:
        assert error["field"] == field, error


# --------------------------------------------------------------------------------------------------
# isolation
# --------------------------------------------------------------------------------------------------


def test_every_task_endpoint_is_404_for_another_tenant(tenants: Tenants) -> None:
    receiver = Receiver("whsec_unused")
    try:
        body = {**seed_body(), "webhook_url": receiver.url("/cross")}
        task_id = tenants.submit(tenants.a, body).json()["id"]
        tenants.wait_final(tenants.a, task_id)
        receiver.wait_for("/cross", 1)
        slow_id = tenants.submit(tenants.a, with_directive(delay_ms="1500")).json()["id"]
        endpoints = [
            ("GET", f"/v1/tasks/{task_id}"),
            ("GET", f"/v1/tasks/{task_id}/outputs/0"),
            ("POST", f"/v1/tasks/{task_id}/webhook/redeliver"),
            ("POST", f"/v1/tasks/{task_id}/cancel"),
            ("POST", f"/v1/tasks/{slow_id}/cancel"),
        ]
        seen: dict[tuple[str, str], int] = {}
        for tenant in (tenants.b, tenants.a):  # the other tenant first: its cancel must change nothing
            for method, path in endpoints:
                response = tenants.call(method, path, tenant, follow_redirects=False)
                seen[
                    (tenant[0], f"{method} {path.replace(task_id, '{done}').replace(slow_id, '{queued}')}")
                ] = response.status_code
                if tenant == tenants.b:
                    assert_error(response, 404, "not_found", "id")
                    # the same answer as for an id that does not exist: no oracle of which ids exist
                    unknown = str(uuid.uuid4())
                    missing = tenants.call(
                        method, path.replace(task_id, unknown).replace(slow_id, unknown), tenant
                    )
                    assert response.json() == json.loads(missing.text.replace(unknown, path.split("/")[3]))
    finally:
        receiver.stop()
    assert seen == {
        ("b", "GET /v1/tasks/{done}"): 404,
        ("b", "GET /v1/tasks/{done}/outputs/0"): 404,
        ("b", "POST /v1/tasks/{done}/webhook/redeliver"): 404,
        ("b", "POST /v1/tasks/{done}/cancel"): 404,
        ("b", "POST /v1/tasks/{queued}/cancel"): 404,
        ("a", "GET /v1/tasks/{done}"): 200,
        ("a", "GET /v1/tasks/{done}/outputs/0"): 302,
        ("a", "POST /v1/tasks/{done}/webhook/redeliver"): 202,
        ("a", "POST /v1/tasks/{done}/cancel"): 409,
        ("a", "POST /v1/tasks/{queued}/cancel"): 200,
    }
    print("\n".join(f"| {tenant} | {endpoint} | {status} |" for (tenant, endpoint), status in seen.items()))


def test_no_key_a_wrong_key_and_the_admin_key_are_refused_on_task_endpoints(tenants: Tenants) -> None:
    path = "/v1/tasks/00000000-0000-4000-8000-000000000000"
    assert_error(tenants.call("GET", path, None), 401, "unauthorized", "Authorization")
    wrong = tenants.stack.http.get(f"{tenants.url}{path}", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "unauthorized", "Authorization")
    assert_error(tenants.call("GET", path, "admin"), 403, "forbidden", "Authorization")
    assert_error(tenants.call("GET", "/v1/admin/tenants", tenants.a), 401, "unauthorized", "Authorization")


def raw_request(port: int, authorization: bytes) -> tuple[int, bytes]:
    """One GET with an Authorization header of exactly these bytes (no client library would send some
    of them); the status line's code and the body."""
    request = (
        b"GET /v1/usage HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nAuthorization: " + authorization
        + b"\r\nConnection: close\r\n\r\n"
    )  # fmt: skip
    with socket.create_connection((HOST, port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


ODD_AUTHORIZATION = [
    b"",
    b"Bearer",
    b"Bearer ",
    b"Basic dXNlcjpwYXNz",
    b"Bearer two tokens",
    b"bEaReR    spaced-out   ",
    "Bearer ключ".encode(),  # UTF-8
    "Bearer clé".encode("latin-1"),  # a byte that is no UTF-8
    b"Bearer \x01\x02control",
    b"Bearer " + b"x" * 8000,
    b"\xff\xfe\xfd",
]


@pytest.mark.parametrize("authorization", ODD_AUTHORIZATION, ids=range(len(ODD_AUTHORIZATION)))
def test_any_authorization_header_is_401_never_500(tenants: Tenants, authorization: bytes) -> None:
    status, body = raw_request(tenants.api.port, authorization)
    assert status == 401, body[:300]
    assert b'"unauthorized"' in body


# --------------------------------------------------------------------------------------------------
# keys and the admin API
# --------------------------------------------------------------------------------------------------


def redis_values(stack: Stack) -> list[bytes]:
    """Every string and hash value in Redis, and every hash field."""
    client = stack.runtime.redis
    found: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            found.append(client.get(key) or b"")
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                found += [field, value]
    return found


def test_keys_are_hashed_at_rest_and_revocation_reaches_every_api_process(tenants: Tenants) -> None:
    other_process = ApiServer(tenants.api.app.extensions["runtime"].config)
    try:
        created = tenants.call("POST", f"/v1/admin/tenants/{tenants.a}/keys", "admin")
        assert created.status_code == 201, created.text
        key, key_id = created.json()["key"], created.json()["id"]
        assert created.json()["tenant"] == tenants.a
        assert not any(key.encode() in value for value in redis_values(tenants.stack)), "kept in plain text"
        listed = tenants.call("GET", "/v1/admin/keys", "admin").json()["data"]
        assert {"id": key_id, "tenant": tenants.a} in [
            {"id": item["id"], "tenant": item["tenant"]} for item in listed
        ] and "key" not in str(listed).replace("'key_", "")

        usage_url = f"{other_process.url}/v1/usage"
        as_new_key = {"Authorization": f"Bearer {key}"}
        assert tenants.stack.http.get(usage_url, headers=as_new_key).json()["tenant"] == tenants.a
        revoked = tenants.call("DELETE", f"/v1/admin/keys/{key_id}", "admin")
        assert revoked.status_code == 204 and "content-type" not in revoked.headers
        for url in (usage_url, f"{tenants.url}/v1/usage"):  # the next request, on either process
            assert_error(tenants.stack.http.get(url, headers=as_new_key), 401, "unauthorized")
        assert_error(tenants.call("DELETE", f"/v1/admin/keys/{key_id}", "admin"), 404, "not_found")
    finally:
        other_process.stop()


def test_admin_api_settings_are_checked_and_listed(tenants: Tenants) -> None:
    path = f"/v1/admin/tenants/{tenants.a}"
    for body, field in [
        ({"weight": 0}, "weight"),
        ({"max_queued": -1}, "max_queued"),
        ({"max_concurrency": 1.5}, "max_concurrency"),
        ({"rate_per_minute": "fast"}, "rate_per_minute"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"colour": "blue"}, "colour"),
    ]:
        assert_error(tenants.call("PUT", path, "admin", json=body), 400, "invalid_field", field)
    assert_error(tenants.call("PUT", "/v1/admin/tenants/Bad%20Name", "admin", json={}), 400, "invalid_tenant")
    assert_error(tenants.call("PUT", path, "admin", json=[1]), 400, "invalid_body")
    changed = tenants.call("PUT", path, "admin", json={"weight": 3, "max_concurrency": 7})
    assert changed.json()["settings"]["weight"] == 3 and changed.json()["settings"]["max_concurrency"] == 7
    reset = tenants.call("PUT", path, "admin", json={"weight": None}).json()["settings"]
    assert reset["weight"] == 1 and reset["max_concurrency"] == 7, "null resets one, the others stay"
    listed = {
        item["tenant"]: item for item in tenants.call("GET", "/v1/admin/tenants", "admin").json()["data"]
    }
    assert listed[tenants.a]["settings"]["max_concurrency"] == 7 and listed[tenants.a]["keys"] == 1
    assert listed[tenants.b]["settings"]["max_concurrency"] == 0, "the other tenant keeps the defaults"


def test_the_admin_api_is_off_without_an_admin_key(stack: Stack) -> None:
    response = stack.http.get(f"{stack.api_url}/v1/admin/tenants")
    assert_error(response, 404, "not_found")


# --------------------------------------------------------------------------------------------------
# webhook secrets
# --------------------------------------------------------------------------------------------------


def verifies(secret: str, received: Any) -> bool:
    try:
        Webhook(secret).verify(received.body, received.headers)
    except WebhookVerificationError:
        return False
    return True


def test_each_tenant_signs_with_its_own_secret_and_a_rotation_signs_with_both(tenants: Tenants) -> None:
    secret = {
        tenant: tenants.call("GET", "/v1/webhooks/secret", tenant).json()["key"] for tenant in tenants.keys
    }
    assert secret[tenants.a] != secret[tenants.b] and all(key.startswith("whsec_") for key in secret.values())
    assert tenants.call("GET", "/v1/webhooks/secret", tenants.a).json()["key"] == secret[tenants.a], "stable"
    receiver = Receiver("whsec_unused")
    try:
        for tenant in tenants.keys:
            body = {**seed_body(), "webhook_url": receiver.url(f"/{tenant}")}
            assert tenants.submit(tenant, body).status_code == 202
        for tenant, other in ((tenants.a, tenants.b), (tenants.b, tenants.a)):
            [received] = receiver.wait_for(f"/{tenant}", 1)
            assert verifies(secret[tenant], received), "signed with its tenant's secret"
            assert not verifies(secret[other], received), "and not verifiable with another's"

        rotated = tenants.call("POST", "/v1/webhooks/secret/rotate", tenants.a).json()
        assert rotated["key"] != secret[tenants.a] and rotated["previous_valid_until"]
        assert tenants.call("GET", "/v1/webhooks/secret", tenants.a).json()["key"] == rotated["key"]
        body = {**seed_body(), "webhook_url": receiver.url("/rotated")}
        assert tenants.submit(tenants.a, body).status_code == 202
        [received] = receiver.wait_for("/rotated", 1)
        assert len(received.headers["webhook-signature"].split(" ")) == 2, "one signature per valid secret"
        assert verifies(rotated["key"], received) and verifies(secret[tenants.a], received)
        assert not verifies(secret[tenants.b], received)
    finally:
        receiver.stop()


# --------------------------------------------------------------------------------------------------
# limits and usage
# --------------------------------------------------------------------------------------------------


def test_max_queued_refuses_with_429_until_tasks_finish(tenants: Tenants) -> None:
    tenants.settings(tenants.a, max_queued=2)
    first = [tenants.submit(tenants.a, with_directive(delay_ms="800")) for _ in range(2)]
    assert [response.status_code for response in first] == [202, 202]
    refused = tenants.submit(tenants.a, seed_body())
    assert_error(refused, 429, "tenant_queue_full")
    assert int(refused.headers["Retry-After"]) >= 1
    assert tenants.submit(tenants.b, seed_body()).status_code == 202, "another tenant is not held back"
    for response in first:
        tenants.wait_final(tenants.a, response.json()["id"])
    assert tenants.submit(tenants.a, seed_body()).status_code == 202, "room again once they are done"


def test_rate_per_minute_refuses_with_429_and_retry_after(tenants: Tenants) -> None:
    tenants.settings(tenants.a, rate_per_minute=2)
    assert [tenants.submit(tenants.a, seed_body()).status_code for _ in range(2)] == [202, 202]
    refused = tenants.submit(tenants.a, seed_body())
    assert_error(refused, 429, "rate_limited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 31, "a token every 30 s"
    assert tenants.submit(tenants.b, seed_body()).status_code == 202


def intervals(stack: Stack, keys: set[str]) -> list[tuple[float, float]]:
    """(started, finished) of the simulator's calls for these directive keys."""
    return [(call["started"], call["finished"]) for call in stack.sim_call_log() if call["key"] in keys]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_max_concurrency_bounds_a_tenants_calls_in_flight(tenants: Tenants) -> None:
    tenants.settings(tenants.a, max_concurrency=1)
    bodies = slow_bodies(4, 300)
    ids = [tenants.submit(tenants.a, body).json()["id"] for body in bodies]
    for task_id in ids:
        assert tenants.wait_final(tenants.a, task_id)["status"] == "succeeded"
    spans = intervals(tenants.stack, {directive_key(body) for body in bodies})
    assert len(spans) == 4 and most_at_once(spans) == 1, spans


def test_queue_position_counts_the_tenants_tasks_waiting_ahead(tenants: Tenants) -> None:
    tenants.settings(tenants.a, max_concurrency=1)
    ids = [tenants.submit(tenants.a, with_directive(delay_ms="1500")).json()["id"] for _ in range(3)]
    first, second, third = (tenants.task(tenants.a, task_id) for task_id in ids)
    assert first["queue_position"] in (0, None), "admitted at once (0), or running already (null)"
    assert (second["queue_position"], third["queue_position"]) == (1, 2)
    tenants.wait_final(tenants.a, ids[0])
    assert wait_until(
        lambda: tenants.task(tenants.a, ids[2])["queue_position"] == 1, timeout=10, what="moved up"
    )
    for task_id in ids:
        assert tenants.wait_final(tenants.a, task_id)["queue_position"] is None


def test_priority_orders_a_tenants_waiting_tasks_and_low_ages(tenants: Tenants) -> None:
    tenants.settings(tenants.a, max_concurrency=1)
    blocker = tenants.submit(tenants.a, with_directive(delay_ms="800")).json()["id"]
    names = ["low", "normal-1", "normal-2", "high"]
    ids = {
        name: tenants.submit(
            tenants.a, {**with_directive(delay_ms="50"), "priority": name.split("-")[0]}
        ).json()["id"]
        for name in names
    }
    assert tenants.task(tenants.a, ids["high"])["priority"] == "high"
    started = {
        name: epoch_ms(tenants.wait_final(tenants.a, task_id)["attempts"][0]["started_at"])
        for name, task_id in ids.items()
    }
    assert epoch_ms(tenants.task(tenants.a, blocker)["attempts"][0]["started_at"]) < started["high"]
    assert sorted(started, key=started.__getitem__) == ["high", "normal-1", "normal-2", "low"]
    bad = tenants.submit(tenants.a, {**seed_body(), "priority": "urgent"})
    assert_error(bad, 400, "invalid_field", "priority")
    # low ages: behind normal tasks created up to LOW_PRIORITY_AGING after it, ahead of later ones
    aging_ms = round(LOW_PRIORITY_AGING * 1000)
    assert ready_order(0, "low") > ready_order(aging_ms - 1, "normal")
    assert ready_order(0, "low") < ready_order(aging_ms + 1, "normal")
    assert ready_order(30 * 86400 * 1000, "high") < ready_order(0, "normal"), "even 30 days younger"


def test_usage_counts_per_day_for_the_callers_tenant_only(tenants: Tenants) -> None:
    ids = [tenants.submit(tenants.a, seed_body()).json()["id"] for _ in range(2)]
    outputs = [tenants.wait_final(tenants.a, task_id)["outputs"] for task_id in ids]
    [today] = tenants.call("GET", "/v1/usage", tenants.a).json()["days"]
    assert today["submitted"] == 2 and today["succeeded"] == 2 and today["failed"] == 0
    assert today["upstream_calls"] == 2
    assert today["images"] == sum(len(items) for items in outputs)
    assert today["bytes_stored"] == sum(item["bytes"] for items in outputs for item in items) > 0
    assert tenants.call("GET", "/v1/usage", tenants.b).json() == {"tenant": tenants.b, "days": []}
    assert_error(tenants.call("GET", "/v1/usage?days=0", tenants.a), 400, "invalid_field", "days")


# --------------------------------------------------------------------------------------------------
# fair share (a stack of its own: a global cap of 4)
# --------------------------------------------------------------------------------------------------


@pytest.mark.stack(workers=1, UPSTREAM_MAX_CONCURRENCY="4", WORKER_CONCURRENCY="8")
def test_a_backlog_of_one_tenant_does_not_hold_back_another(fault_stack: Stack) -> None:
    stack = fault_stack
    # A's backlog as one batch, so that it is all stored at once, however slow the machine
    response = stack.submit_batch({"requests": slow_bodies(40, 500)}, tenant="fault-a")
    assert response.status_code == 202, response.text
    a_ids = response.json()["task_ids"]
    wait_until(lambda: len(stack.sim_call_log()) >= 4, timeout=30, what="A's first calls")
    b_bodies = slow_bodies(4, 500)
    b_ids = submit_many_as(stack, "fault-b", b_bodies)
    b_submitted = now_ms()
    tasks = settle_succeeded(stack, a_ids + b_ids, timeout=120)
    started = {task_id: epoch_ms(task["attempts"][0]["started_at"]) for task_id, task in tasks.items()}
    last_b = max(started[task_id] for task_id in b_ids)
    # Measured against A's tasks still waiting once B's were stored (how many depends on how fast A's 40
    # were submitted): FIFO would start every one of them before B's last. Fair share gives B the places
    # that free up until it holds as many as A, then half of them (equal weights, ties to the older task,
    # A's), so B's four have started within two rounds of 4 places: ahead of B's last go at most the
    # window's worth admitted before B's tasks existed (4) and A's half of two rounds (4); 2 to 4 measured.
    a_waiting = [task_id for task_id in a_ids if started[task_id] > b_submitted]
    ahead_of_b = [task_id for task_id in a_waiting if started[task_id] < last_b]
    assert len(a_waiting) >= 20, f"A's backlog had run down to {len(a_waiting)} when B's tasks came"
    assert len(ahead_of_b) <= 8, f"{len(ahead_of_b)} of A's {len(a_waiting)} waiting started before B's last"
    assert stack.sim_stats()["max_in_flight"] <= 4, "the global cap holds"


def submit_many_as(stack: Stack, tenant: str, bodies: list[dict[str, Any]]) -> list[str]:
    ids = []
    for body in bodies:
        response = stack.submit(body, tenant=tenant)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


# --------------------------------------------------------------------------------------------------
# no cap at all: the workers' capacity is the window (a stack of its own: one worker of 2 threads)
# --------------------------------------------------------------------------------------------------


@pytest.mark.stack(workers=1, WORKER_CONCURRENCY="2")
def test_without_a_cap_tasks_the_workers_cannot_start_wait_in_priority_order(fault_stack: Stack) -> None:
    """With no UPSTREAM_MAX_CONCURRENCY the broker still holds no backlog: the window is what the
    consuming workers can run (their announced slots), so a high task submitted behind normal ones starts
    first, and queue_position counts."""
    stack = fault_stack
    client, keys = stack.runtime.redis, stack.runtime.keys
    [slots] = [member.decode() for member in client.zrange(keys.capacity, 0, -1)]
    assert slots == f"{socket.gethostname()}:{stack.children['worker0'].pid}=2"
    blockers = slow_bodies(2, 1500)
    blocker_ids = submit_many_as(stack, "fault-a", blockers)
    wait_until(lambda: len(stack.sim_call_log()) == 2, timeout=20, what="both slots busy")
    names = ["normal-1", "normal-2", "normal-3", "high"]
    ids = {}
    for name in names:
        body = {**with_directive(delay_ms="50"), "priority": name.split("-")[0]}
        ids[name] = stack.submit(body, tenant="fault-a").json()["id"]
    positions = {name: stack.task(task_id)["queue_position"] for name, task_id in ids.items()}
    assert positions == {"normal-1": 2, "normal-2": 3, "normal-3": 4, "high": 1}
    tasks = settle_succeeded(stack, [*blocker_ids, *ids.values()], timeout=60)
    started = {name: epoch_ms(tasks[task_id]["attempts"][0]["started_at"]) for name, task_id in ids.items()}
    assert min(started, key=started.__getitem__) == "high", started
    assert stack.sim_stats()["max_in_flight"] <= 2


@pytest.mark.stack(workers=1, WORKER_CONCURRENCY="2", WORKER_PREFETCH_MULTIPLIER="2")
def test_a_prefetch_of_two_hands_each_slot_a_successor(fault_stack: Stack) -> None:
    """With WORKER_PREFETCH_MULTIPLIER=2 the worker announces twice its slots, so admission hands out a
    successor for each running job, which the worker reserves and starts as soon as a slot frees; the
    tasks behind them still wait in the store, in order. (Announcing the slots alone kept the successors
    in the ready set: a prefetch of 2 refilled nothing sooner.)"""
    stack = fault_stack
    client, keys = stack.runtime.redis, stack.runtime.keys
    pid = stack.children["worker0"].pid
    [capacity] = [member.decode() for member in client.zrange(keys.capacity, 0, -1)]
    assert capacity == f"{socket.gethostname()}:{pid}=4"
    [worker] = [w for w in presence.consuming(client, keys) if w["process"].endswith(f":{pid}")]
    assert (worker["slots"], worker["prefetch"]) == (2, 2)
    blocker_ids = submit_many_as(stack, "fault-a", slow_bodies(2, 3000))
    wait_until(lambda: len(stack.sim_call_log()) == 2, timeout=20, what="both slots busy")
    follower_ids = submit_many_as(stack, "fault-a", slow_bodies(3, 50))
    positions = [stack.task(task_id)["queue_position"] for task_id in follower_ids]
    assert positions == [0, 0, 1], "two successors admitted, the third waits in the store"
    wait_until(
        lambda: stack.runtime.broker.backlog(GENERATION_QUEUE) == 0,
        timeout=20,
        what="the worker reserved both successors",
    )
    tasks = settle_succeeded(stack, [*blocker_ids, *follower_ids], timeout=60)
    assert stack.sim_stats()["max_in_flight"] <= 2
    blockers_done = min(epoch_ms(tasks[task_id]["finished_at"]) for task_id in blocker_ids)
    first_started = [epoch_ms(tasks[task_id]["attempts"][0]["started_at"]) for task_id in follower_ids[:2]]
    assert min(first_started) >= blockers_done - 5, "a successor starts only when a slot frees"
