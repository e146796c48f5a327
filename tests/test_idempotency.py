"""Idempotency-Key: one key, one task; replays, reuse with another body, and concurrent requests."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from services.errors import IdempotencyConflict
from services.idempotency import PENDING_SECONDS, Claim, IdempotencyStore, Replay
from services.store import JobStore
from tests.stack import ApiServer, Stack, directive_key, seed_body, with_directive


def post(stack: Stack, body: dict, key: str, **headers: str) -> httpx.Response:
    return stack.submit(body, headers={"Idempotency-Key": key, **headers})


def test_the_same_key_and_body_return_the_original_task(stack: Stack) -> None:
    key = uuid.uuid4().hex
    first = post(stack, seed_body(), key)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    again = post(stack, seed_body(), key)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json() and again.headers["Location"] == first.headers["Location"]
    stack.wait_final(first.json()["id"])
    assert post(stack, seed_body(), key).json()["id"] == first.json()["id"], "also once the task is done"


def test_the_same_key_with_another_body_is_422(stack: Stack) -> None:
    key = uuid.uuid4().hex
    assert post(stack, seed_body(), key).status_code == 202
    other = post(stack, {**seed_body(), "metadata": {"x": 1}}, key)
    assert other.status_code == 422
    assert other.json()["error"] == {
        "code": "idempotency_key_reused",
        "message": other.json()["error"]["message"],
        "field": "Idempotency-Key",
    }


def test_on_an_open_api_every_caller_is_one_tenant(stack: Stack) -> None:
    key = uuid.uuid4().hex
    first = post(stack, seed_body(), key)
    # Open: every caller is the tenant "default", whatever Authorization header it sends.
    again = post(stack, seed_body(), key, Authorization="Bearer someone-else")
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"


@pytest.fixture
def keyed_api(stack: Stack) -> Iterator[ApiServer]:
    keys = (("tenant-a", "key-a1"), ("tenant-a", "key-a2"), ("tenant-b", "key-b"))
    api = ApiServer(dataclasses.replace(stack.config, api_keys=keys))
    yield api
    api.stop()


def test_with_api_keys_a_key_is_scoped_to_the_tenant_that_sent_it(stack: Stack, keyed_api: ApiServer) -> None:
    url = f"{keyed_api.url}/v1/images/generations"

    def post_as(authorization: str, key: str) -> httpx.Response:
        headers = {"Authorization": authorization, "Idempotency-Key": key}
        response = stack.http.post(url, json=seed_body(), headers=headers)
        assert response.status_code == 202, response.text
        return response

    key = uuid.uuid4().hex
    first = post_as("Bearer key-a1", key)
    again = post_as("Bearer key-a1", key)
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    # The scheme in another case, odd spaces, or another key of the same tenant: the same tenant's key.
    assert post_as("bearer   key-a1", key).json()["id"] == first.json()["id"]
    assert post_as("Bearer key-a2", key).json()["id"] == first.json()["id"], "one tenant, one scope"
    other = post_as("Bearer key-b", key)
    assert other.json()["id"] != first.json()["id"] and "Idempotent-Replayed" not in other.headers
    assert post_as("Bearer key-b", key).json()["id"] == other.json()["id"], "B's replay is B's task"
    assert post_as("Bearer key-a1", key).json()["id"] == first.json()["id"], "A's task is still A's"


def test_a_rejected_request_gives_its_key_back(stack: Stack) -> None:
    key = uuid.uuid4().hex
    bad = seed_body()
    bad["generationConfig"]["imageConfig"]["aspectRatio"] = "7:3"
    assert post(stack, bad, key).status_code == 400
    assert post(stack, seed_body(), key).status_code == 202


def test_invalid_keys_are_400(stack: Stack) -> None:
    for key in ("x" * 256, "tab\there"):
        response = post(stack, seed_body(), key)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_idempotency_key"


def test_concurrent_requests_with_one_key_create_one_task(stack: Stack) -> None:
    key = uuid.uuid4().hex
    body = with_directive(delay_ms="500")
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: post(stack, body, key), range(16)))
    statuses = {response.status_code for response in responses}
    assert statuses <= {202, 409}, statuses
    ids = {response.json()["id"] for response in responses if response.status_code == 202}
    assert len(ids) == 1
    for response in responses:
        if response.status_code == 409:
            assert response.json()["error"]["code"] == "idempotency_in_progress"
    task = stack.wait_final(ids.pop())
    assert task["status"] == "succeeded"
    assert stack.sim_calls(directive_key(body)) == 1, "the upstream was called once"


def _create(store: JobStore, claim: Claim) -> str:
    return store.create(
        model="m",
        payload=b"{}",
        metadata=None,
        also_set=lambda tasks: claim.done_record(202, {"id": tasks[0]["id"]}),
    )["id"]


def test_a_request_slower_than_its_claim_creates_nothing_once_the_key_is_claimed_again(
    redis_client: redis.Redis,
) -> None:
    """A claim expires after PENDING_SECONDS (a request that never creates its task, e.g. cut off by a
    Redis failover, must not block its key for long); a first request slower than that, whose key a
    retry claimed meanwhile, creates nothing and gives back nothing of the retry's."""
    store = JobStore(redis_client, prefix="idem-slow")
    idempotency = IdempotencyStore(redis_client, store.keys, 86400)
    slow = idempotency.claim("k", scope="default", body=b"{}")
    assert isinstance(slow, Claim) and 0 < redis_client.ttl(slow.redis_key) <= PENDING_SECONDS
    redis_client.delete(slow.redis_key)  # its pending record expired
    retry = idempotency.claim("k", scope="default", body=b"{}")
    assert isinstance(retry, Claim)
    with pytest.raises(IdempotencyConflict):
        _create(store, slow)
    idempotency.release(slow)
    assert redis_client.get(retry.redis_key) == retry.pending.encode(), "the retry's claim is untouched"
    task_id = _create(store, retry)
    replay = idempotency.claim("k", scope="default", body=b"{}")
    assert isinstance(replay, Replay) and replay.body == {"id": task_id}
    assert redis_client.zcard(store.keys.queued) == 1, "one task for the key"


def test_an_expired_claim_nobody_took_again_still_creates(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, prefix="idem-expired")
    idempotency = IdempotencyStore(redis_client, store.keys, 86400)
    claim = idempotency.claim("k", scope="default", body=b"{}")
    assert isinstance(claim, Claim)
    redis_client.delete(claim.redis_key)
    task_id = _create(store, claim)
    replay = idempotency.claim("k", scope="default", body=b"{}")
    assert isinstance(replay, Replay) and replay.body == {"id": task_id}
