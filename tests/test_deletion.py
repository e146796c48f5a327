"""Deleting a task (``DELETE /v1/tasks/{id}``) and retention: records expire after TASK_RETENTION_DAYS,
outputs by the bucket's lifecycle rule that workers set (OUTPUT_RETENTION_DAYS)."""

from __future__ import annotations

import dataclasses

import redis

from services.errors import JobError
from services.jobs import out_of_attempts
from services.storage import Storage
from services.store import JobStore
from tests.stack import ApiServer, Stack, seed_body, with_directive


def test_a_deleted_task_is_gone_with_its_images_and_everything_kept_of_it(stack: Stack) -> None:
    body = {**seed_body(), "webhook_url": "http://127.0.0.1:9/hooks", "metadata": {"delete": "me"}}
    task_id = stack.submit(body).json()["id"]
    assert stack.wait_final(task_id)["status"] == "succeeded"
    assert stack.output_objects(task_id), "it stored an image"
    keys, client = stack.runtime.keys, stack.runtime.redis
    assert client.exists(keys.task(task_id), keys.payload(task_id)) == 2

    response = stack.http.delete(f"{stack.api_url}/v1/tasks/{task_id}")
    assert response.status_code == 204 and response.content == b""
    assert "content-type" not in response.headers, "no content, no type"
    assert stack.http.get(f"{stack.api_url}/v1/tasks/{task_id}").status_code == 404
    assert stack.output_objects(task_id) == []
    assert client.exists(keys.task(task_id), keys.payload(task_id), keys.webhook_log(task_id)) == 0
    assert client.zscore(keys.tenant_tasks("default"), task_id) is None
    assert client.zscore(keys.tenant_status("default", "succeeded"), task_id) is None
    assert not client.keys(f"{keys.webhook_event('msg_' + task_id)}*"), "its webhook events too"
    listed = stack.http.get(f"{stack.api_url}/v1/tasks?metadata.delete=me&limit=100").json()["data"]
    assert task_id not in [task["id"] for task in listed]
    assert stack.http.delete(f"{stack.api_url}/v1/tasks/{task_id}").status_code == 404


def test_only_a_final_task_of_ones_own_can_be_deleted(stack: Stack) -> None:
    slow = stack.submit(with_directive(delay_ms="2000")).json()["id"]
    refused = stack.http.delete(f"{stack.api_url}/v1/tasks/{slow}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "invalid_transition"
    api = ApiServer(dataclasses.replace(stack.config, api_keys=(("other-tenant", "other-key"),)))
    try:
        done = stack.submit(seed_body()).json()["id"]
        stack.wait_final(done)
        other = stack.http.delete(f"{api.url}/v1/tasks/{done}", headers={"Authorization": "Bearer other-key"})
        assert other.status_code == 404, "another tenant's task is not found"
        assert stack.task(done)["status"] == "succeeded", "and is still there"
    finally:
        api.stop()
    stack.wait_final(slow)
    assert stack.http.delete(f"{stack.api_url}/v1/tasks/{slow}").status_code == 204


def test_workers_set_the_buckets_output_retention(stack: Stack) -> None:
    storage = Storage(stack.config)
    rules = storage._client.get_bucket_lifecycle_configuration(Bucket=storage.bucket)["Rules"]
    assert [(rule["Filter"]["Prefix"], rule["Expiration"]["Days"], rule["Status"]) for rule in rules] == [
        ("outputs/", stack.config.output_retention, "Enabled")
    ]


def test_a_final_task_is_kept_task_retention_days(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, prefix="retention-test", task_retention=3 * 86400)
    task_id = store.create(model="m", payload=b"{}", metadata=None)["id"]
    attempt = store.start_attempt(task_id, worker="w", lease_seconds=30, give_up=out_of_attempts(5))
    assert attempt is not None
    store.fail(attempt.lease, JobError("no", code="upstream_rejected"))
    assert 3 * 86400 - 5 <= redis_client.ttl(store.keys.task(task_id)) <= 3 * 86400
