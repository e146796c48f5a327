"""Batches (``POST /v1/batches``): every request validated before any is stored, all stored or none,
exact counts, one ``batch.completed`` webhook when the last task is final, listing by ``batch_id``,
cancel that cuts the running calls off, idempotency, and each tenant sees only its own."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from devstack.processes import wait_until
from services.admission import WORKERS_CAPACITY
from services.batches import Batches, new_batch
from services.errors import TooManyRequests
from services.keys import Keys
from services.records import WebhookSubscription
from services.store import JobStore, NewTask
from services.tenants import TenantSettings
from services.validation import MAX_BATCH_REQUESTS
from services.webhooks.outbox import WebhookOutbox
from tests.fault_kit import assert_bookkeeping_empty, settle_succeeded, slow_bodies, worker_holding_calls
from tests.receiver import Receiver
from tests.stack import Stack, directive_key, seed_body, with_directive


@pytest.fixture(scope="module")
def receiver(stack: Stack) -> Iterator[Receiver]:
    running = Receiver(stack.env["WEBHOOK_SIGNING_SECRET"])
    yield running
    running.stop()


def post_batch(stack: Stack, body: Any, tenant: str | None = None, **headers: str) -> httpx.Response:
    return stack.submit_batch(body, tenant=tenant, headers=headers)


def get_batch(stack: Stack, batch_id: str, tenant: str | None = None) -> httpx.Response:
    return stack.http.get(f"{stack.api_url}/v1/batches/{batch_id}", headers=stack.headers(tenant))


def wait_batch(stack: Stack, batch_id: str, tenant: str | None = None, timeout: float = 60) -> dict[str, Any]:
    def completed() -> dict[str, Any] | None:
        batch = get_batch(stack, batch_id, tenant).json()
        return batch if batch["completed_at"] else None

    try:
        return wait_until(completed, timeout=timeout, what=f"batch {batch_id} to complete")  # type: ignore[return-value]
    except TimeoutError:
        raise AssertionError(f"not completed: {get_batch(stack, batch_id, tenant).json()}") from None


def listed(stack: Stack, tenant: str | None = None, **params: str) -> list[dict[str, Any]]:
    """Every page of ``GET /v1/tasks`` with ``params``, followed to the end."""
    tasks: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = stack.http.get(f"{stack.api_url}/v1/tasks", params=query, headers=stack.headers(tenant))
        assert page.status_code == 200, page.text
        tasks += page.json()["data"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return tasks


def test_a_batch_runs_every_task_and_completes_once_with_its_webhook(
    stack: Stack, receiver: Receiver
) -> None:
    path = f"/batches/{uuid.uuid4().hex[:12]}"
    failing = with_directive(script="400")
    requests = [with_directive(), with_directive(), failing, {**with_directive(), "metadata": {"n": "4"}}]
    body = {
        "requests": requests,
        "metadata": {"job": "nightly"},
        "webhook_url": receiver.url(path),
        "webhook_events": ["batch.completed", "task.succeeded"],
    }
    response = post_batch(stack, body, **{"Cancel-After": "1h"})
    assert response.status_code == 202, response.text
    accepted = response.json()
    batch_id, task_ids = accepted["id"], accepted["task_ids"]
    assert accepted["status"] == "in_progress" and len(task_ids) == 4
    assert (
        response.headers["Location"] == accepted["links"]["self"] == f"{stack.api_url}/v1/batches/{batch_id}"
    )

    batch = wait_batch(stack, batch_id)
    assert batch["status"] == "completed" and batch["metadata"] == {"job": "nightly"}
    assert batch["counts"] == {
        "total": 4,
        "queued": 0,
        "running": 0,
        "succeeded": 3,
        "failed": 1,
        "canceled": 0,
    }
    assert batch["task_ids"] == task_ids
    tasks = {task_id: stack.task(task_id) for task_id in task_ids}
    assert {task["batch_id"] for task in tasks.values()} == {batch_id}
    assert all(task["deadline_at"] for task in tasks.values()), "Cancel-After applies to each task"
    assert tasks[task_ids[3]]["metadata"] == {"n": "4"}
    last_finished = max(task["finished_at"] for task in tasks.values())
    assert batch["completed_at"] >= last_finished

    arrived = receiver.wait_for(path, 4)  # three task.succeeded, one batch.completed
    wait_until(lambda: len(receiver.at(path)) >= 4, timeout=5, what="every webhook")
    kinds = sorted(item.payload["type"] for item in receiver.at(path))
    assert kinds == ["batch.completed", "task.succeeded", "task.succeeded", "task.succeeded"]
    assert all(item.verify_error is None for item in arrived)
    [completed] = [item for item in receiver.at(path) if item.payload["type"] == "batch.completed"]
    assert completed.webhook_id == f"msg_{batch_id}_completed"
    assert completed.payload["data"]["counts"] == batch["counts"]
    assert completed.payload["data"]["status"] == "completed"
    wait_until(
        lambda: (
            [d["outcome"] for d in get_batch(stack, batch_id).json()["webhook"]["deliveries"]]
            == ["delivered"]
        ),
        timeout=10,
        what="the batch's delivery log",
    )

    by_batch = listed(stack, batch_id=batch_id, limit="3")
    assert sorted(task["id"] for task in by_batch) == sorted(task_ids)
    assert [task["id"] for task in listed(stack, batch_id=batch_id, status="failed")] == [task_ids[2]]
    assert stack.sim_calls(directive_key(failing)) == 1


def test_a_request_that_is_not_valid_anywhere_in_the_batch_stores_nothing(stack: Stack) -> None:
    client, keys = stack.runtime.redis, stack.runtime.keys

    def stored() -> tuple[int, int]:
        return client.zcard(keys.tenant_tasks("default")), len(list(client.scan_iter(keys.batch("*"))))

    before = stored()
    bad = seed_body()
    bad["model"] = "no such model!"
    cases = [
        ({"requests": [seed_body(), seed_body(), bad]}, "requests[2].model"),
        ({"requests": [seed_body(), {**seed_body(), "contents": []}]}, "requests[1].contents"),
        ({"requests": []}, "requests"),
        ({}, "requests"),
        ({"requests": [seed_body()] * (MAX_BATCH_REQUESTS + 1)}, "requests"),
        ({"requests": [seed_body()], "priority": "high"}, "priority"),
        ({"requests": [seed_body()], "webhook_events": ["batch.completed"]}, "webhook_events"),
        (
            {
                "requests": [seed_body()],
                "webhook_url": "http://example.com/h",
                "webhook_events": ["succeeded"],
            },
            "webhook_events[0]",
        ),
        (
            {"requests": [{**seed_body(), "webhook_url": "http://169.254.169.254/"}]},
            "requests[0].webhook_url",
        ),
        ({"requests": [seed_body()], "metadata": "x"}, "metadata"),
        ([seed_body()], None),
    ]
    for body, field in cases:
        response = post_batch(stack, body)
        assert response.status_code == 400, (field, response.text)
        error = response.json()["error"]
        assert error["field"] == field, (field, error)
        assert error["code"] and error["message"]
    assert stored() == before, "nothing stored"


def test_the_same_idempotency_key_gives_the_same_batch_and_another_body_is_refused(stack: Stack) -> None:
    key = f"batch-{uuid.uuid4()}"
    body = {"requests": [with_directive(), with_directive()]}
    first = post_batch(stack, body, **{"Idempotency-Key": key})
    again = post_batch(stack, body, **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    other = post_batch(stack, {"requests": [with_directive()]}, **{"Idempotency-Key": key})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert wait_batch(stack, first.json()["id"])["counts"]["succeeded"] == 2


def test_a_batch_over_the_tenants_queue_limit_is_refused_whole(redis_client: redis.Redis) -> None:
    limits = TenantSettings(max_concurrency=0, max_queued=5, rate_per_minute=0.0, weight=1.0)
    store = JobStore(redis_client, tenant_defaults=limits)
    new = [NewTask(model="m", payload=b"{}", metadata=None) for _ in range(6)]
    with pytest.raises(TooManyRequests) as refused:
        store.create_many(new, tenant="acme")
    assert refused.value.code == "tenant_queue_full"
    assert redis_client.dbsize() == 0, "nothing written"
    assert len(store.create_many(new[:5], tenant="acme")) == 5
    with pytest.raises(TooManyRequests):
        store.create(model="m", payload=b"{}", metadata=None, tenant="acme")


@pytest.mark.stack(workers=1, UPSTREAM_MAX_CONCURRENCY="1")
def test_cancel_cuts_the_running_call_off_and_cancels_the_rest(fault_stack: Stack) -> None:
    stack = fault_stack
    secret = stack.http.get(f"{stack.api_url}/v1/webhooks/secret", headers=stack.headers("fault-a"))
    receiver = Receiver(secret.json()["key"])
    try:
        running_body = with_directive(delay_ms="30000")
        requests = [running_body, *(with_directive(delay_ms="30000") for _ in range(3))]
        body = {"requests": requests, "webhook_url": receiver.url("/b")}
        response = post_batch(stack, body, tenant="fault-a")
        assert response.status_code == 202, response.text
        batch_id, task_ids = response.json()["id"], response.json()["task_ids"]
        key = directive_key(running_body)
        wait_until(lambda: stack.sim_calls(key), timeout=20, what="the first call to start")

        assert get_batch(stack, batch_id, "fault-b").status_code == 404, "another tenant's batch"
        assert listed(stack, "fault-b", batch_id=batch_id) == []
        cancel_other = stack.http.post(
            f"{stack.api_url}/v1/batches/{batch_id}/cancel", headers=stack.headers("fault-b")
        )
        assert cancel_other.status_code == 404

        sent = time.time()
        canceled = stack.http.post(
            f"{stack.api_url}/v1/batches/{batch_id}/cancel", headers=stack.headers("fault-a")
        )
        assert canceled.status_code == 200, canceled.text
        assert canceled.json()["status"] == "canceled" and canceled.json()["counts"]["canceled"] == 4

        def ended() -> dict[str, Any] | None:
            call = next((c for c in stack.sim_call_log() if c["key"] == key), None)
            return call if call and call["finished"] is not None else None

        call = wait_until(ended, timeout=10, what="the upstream to see its client go")
        assert call["status"] is None and call["finished"] - sent < 1.0  # type: ignore[index]
        assert [c["key"] for c in stack.sim_call_log()] == [key], "no other task called the upstream"
        for task_id in task_ids:
            stack.owners[task_id] = "fault-a"
            assert stack.task(task_id)["status"] == "canceled"

        [completed] = receiver.wait_for("/b", 1)
        assert completed.verify_error is None and completed.payload["data"]["status"] == "canceled"
        again = stack.http.post(
            f"{stack.api_url}/v1/batches/{batch_id}/cancel", headers=stack.headers("fault-a")
        )
        assert again.status_code == 409
        assert_bookkeeping_empty(stack)
    finally:
        receiver.stop()


def test_batch_counts_follow_every_change_exactly(redis_client: redis.Redis) -> None:
    """The counts move in the compare-and-set of each change (retries and cancels included), and the
    batch completes in the change that finishes its last task, once."""
    store = JobStore(redis_client)
    keys = Keys()
    batches = Batches(redis_client, keys, store, WebhookOutbox(redis_client, keys))
    webhook: WebhookSubscription = {"url": "https://example.com/h", "events": ["batch.completed"]}
    batch = new_batch("batch_" + "0" * 32, "default", None, webhook)
    new = [NewTask(model="m", payload=b"{}", metadata=None) for _ in range(3)]
    first, second, third = store.create_many(new, batch=batch)
    assert batches.get(batch.id).counts == {
        "total": 3,
        "queued": 3,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "canceled": 0,
    }
    store.cancel(first["id"])
    store.cancel(second["id"])
    state = batches.get(batch.id)
    assert (state.counts["queued"], state.counts["canceled"], state.completed_at) == (1, 2, None)
    assert redis_client.zcard(keys.webhooks_due) == 0
    store.cancel(third["id"])
    done = batches.get(batch.id)
    assert done.counts["canceled"] == 3 and done.completed_at is not None and done.status == "completed"
    assert redis_client.zrange(keys.webhooks_due, 0, -1) == [f"msg_{batch.id}_completed".encode()]
    event = json.loads(redis_client.get(keys.webhook_event(f"msg_{batch.id}_completed")))
    assert (event["type"], event["batch_id"], event["tenant"]) == ("batch.completed", batch.id, "default")
    assert 0 < redis_client.ttl(keys.batch(batch.id)) <= 30 * 86400


def test_a_batchs_tasks_wait_in_the_order_of_its_requests(redis_client: redis.Redis) -> None:
    """Created in the same millisecond, they still wait in their requests' order (not their ids')."""
    store = JobStore(redis_client, admission_window=WORKERS_CAPACITY)  # no workers: every task waits
    new = [NewTask(model="m", payload=b"{}", metadata=None) for _ in range(50)]
    tasks = store.create_many(new, batch=new_batch("batch_" + "1" * 32, "default", None, None))
    waiting = [member.decode() for member in redis_client.zrange(store.keys.tenant_ready("default"), 0, -1)]
    assert waiting == [task["id"] for task in tasks]
    assert [store.queue_position(store.get(task["id"])) for task in tasks[:3]] == [1, 2, 3]


def test_counts_stay_exact_and_the_batch_completes_once_when_a_worker_is_killed(fault_stack: Stack) -> None:
    """SIGKILL the worker holding most of a batch's calls: its tasks run again elsewhere (running ->
    running after the lease), and the counts, which move with each change, end exact; the batch
    completes once, with one ``batch.completed`` event."""
    stack = fault_stack
    secret = stack.http.get(f"{stack.api_url}/v1/webhooks/secret", headers=stack.headers("fault-b"))
    receiver = Receiver(secret.json()["key"])
    try:
        bodies = slow_bodies(30, 2000)
        response = post_batch(
            stack, {"requests": bodies, "webhook_url": receiver.url("/k")}, tenant="fault-b"
        )
        assert response.status_code == 202, response.text
        batch_id, ids = response.json()["id"], response.json()["task_ids"]
        stack.owners.update(dict.fromkeys(ids, "fault-b"))
        victim, _ = worker_holding_calls(stack, bodies, ids, 20)
        stack.children[victim].kill()
        settle_succeeded(stack, ids)
        batch = wait_batch(stack, batch_id, "fault-b")
        assert batch["counts"] == {
            "total": 30,
            "queued": 0,
            "running": 0,
            "succeeded": 30,
            "failed": 0,
            "canceled": 0,
        }
        assert any(a["outcome"] == "worker_lost" for task_id in ids for a in stack.task(task_id)["attempts"])
        [event] = receiver.wait_for("/k", 1)
        assert event.verify_error is None and event.payload["data"]["counts"] == batch["counts"]
        wait_until(
            lambda: get_batch(stack, batch_id, "fault-b").json()["webhook"]["deliveries"],
            timeout=10,
            what="log",
        )
        assert [item.webhook_id for item in receiver.at("/k")] == [f"msg_{batch_id}_completed"]
    finally:
        receiver.stop()
