"""REDIS_MIN_REPLICAS_ACK (services/replication.py): a submission is acknowledged only once enough
replicas hold it; fewer, and it is a 503 with nothing promised, which the same Idempotency-Key retries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devstack.processes import HOST, Child, free_port, start_redis, wait_until
from services.errors import JobError, StoreUnavailable
from services.idempotency import Claim, IdempotencyStore, Replay
from services.keys import Keys
from services.replication import ReplicaAck
from services.store import JobStore


def create(store: JobStore, claim: Claim | None = None) -> str:
    task = store.create(
        model="m",
        payload=b"{}",
        metadata=None,
        also_set=(lambda tasks: claim.done_record(202, {"id": tasks[0]["id"]})) if claim else None,
    )
    return task["id"]


def test_without_a_replica_a_submission_is_not_acknowledged(redis_client: redis.Redis) -> None:
    ack = ReplicaAck(1, timeout=0.05)
    store = JobStore(redis_client, prefix="ack-test", replica_ack=ack)
    idempotency = IdempotencyStore(redis_client, store.keys, 86400, replica_ack=ack)
    claim = idempotency.claim("key-1", scope="default", body=b"{}")
    assert isinstance(claim, Claim)
    with pytest.raises(StoreUnavailable, match="could not confirm the write on 1 replica"):
        create(store, claim)
    assert redis_client.zcard(store.keys.queued) == 1, "written on the primary all the same"
    with pytest.raises(StoreUnavailable):
        idempotency.claim("key-1", scope="default", body=b"{}")  # its replay waits for a replica too
    assert redis_client.ttl(claim.redis_key) > 86000, "the replay kept the record's TTL"


def test_a_refused_submission_is_refused_whatever_the_replicas(redis_client: redis.Redis) -> None:
    from services.errors import TooManyRequests
    from services.tenants import TenantSettings

    store = JobStore(
        redis_client,
        prefix="ack-refused",
        tenant_defaults=TenantSettings(max_concurrency=0, max_queued=1, rate_per_minute=0, weight=1),
        replica_ack=ReplicaAck(1, timeout=0.05),
    )
    with pytest.raises(StoreUnavailable):
        create(store)
    with pytest.raises(TooManyRequests):
        create(store)


def test_a_closing_write_counts_only_once_a_replica_holds_it(redis_client: redis.Redis) -> None:
    """An attempt's closing write (what the upstream was paid for) waits for a replica like a submission:
    unconfirmed, it raises ``StoreUnavailable`` (the worker sends it again) though it is applied on the
    primary; sent again, it finds itself applied and only asks for the confirmation again."""
    plain = JobStore(redis_client, prefix="ack-close")
    acked = JobStore(redis_client, prefix="ack-close", replica_ack=ReplicaAck(1, timeout=0.05))
    task_id = create(plain)
    attempt = plain.start_attempt(task_id, worker="w", lease_seconds=30, give_up=lambda task: None)
    assert attempt is not None
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="could not confirm the write on 1 replica"):
            acked.succeed(attempt.lease, outputs=[], text=[], usage=None, upstream_status=200)
    done = plain.get(task_id)
    assert done["status"] == "succeeded" and len(done["attempts"]) == 1
    assert plain.succeed(attempt.lease, outputs=[], text=[], usage=None, upstream_status=200) == done


@pytest.fixture
def primary_with_replica(tmp_path: Path) -> Iterator[redis.Redis]:
    primary_port, replica_port = free_port(), free_port()
    children: list[Child] = []
    try:
        children.append(start_redis(tmp_path / "a", primary_port, log_dir=tmp_path, name="redis-a"))
        children.append(
            start_redis(
                tmp_path / "b", replica_port, log_dir=tmp_path, name="redis-b", replicaof=primary_port
            )
        )
        client = redis.Redis(host=HOST, port=primary_port, socket_timeout=5)
        wait_until(
            lambda: client.info("replication").get("slave0", {}).get("state") == "online",
            timeout=20,
            what="the replica in sync",
        )
        yield client
        client.close()
    finally:
        for child in children:
            child.stop()


def test_with_a_replica_a_submission_and_its_replay_are_acknowledged(
    primary_with_replica: redis.Redis,
) -> None:
    client = primary_with_replica
    ack = ReplicaAck(1, timeout=1.0)
    store = JobStore(client, prefix="ack-ok", replica_ack=ack)
    client.script_flush()  # as on a new primary after a failover: the script is loaded again
    idempotency = IdempotencyStore(client, Keys("ack-ok"), 86400, replica_ack=ack)
    claim = idempotency.claim("key-1", scope="default", body=b"{}")
    assert isinstance(claim, Claim)
    task_id = create(store, claim)
    replay = idempotency.claim("key-1", scope="default", body=b"{}")
    assert isinstance(replay, Replay) and replay.body == {"id": task_id}
    with pytest.raises(StoreUnavailable):
        create(JobStore(client, prefix="ack-two", replica_ack=ReplicaAck(2, timeout=0.05)))
    attempt = store.start_attempt(task_id, worker="w", lease_seconds=30, give_up=lambda task: None)
    assert attempt is not None
    client.script_flush()
    done = store.fail(attempt.lease, JobError("no", code="upstream_bad_request"))
    assert done["status"] == "failed"
