"""The job store on a real Redis: transitions it allows and refuses, leases, and what the sweeper claims."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from devstack.processes import wait_until
from services.errors import InvalidTransition, JobError, LeaseLost, NotFound
from services.jobs import out_of_attempts
from services.lua import Script
from services.records import TaskRecord
from services.store import JobStore, Lease, TaskStatus

LEASE = 30.0


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    """A store on the unit tests' own Redis, flushed before each test (``tests/conftest.py``)."""
    return JobStore(redis_client, prefix="store-test")


def new_task(store: JobStore, webhook: dict | None = None) -> str:
    return store.create(model="m", payload=b"{}", metadata=None, webhook=webhook)["id"]


def begin(store: JobStore, task_id: str, *, max_attempts: int = 3, lease: float = LEASE):
    """(task, lease) of a started attempt, or None when there is nothing to run."""
    attempt = store.start_attempt(
        task_id, worker="w", lease_seconds=lease, give_up=out_of_attempts(max_attempts)
    )
    return None if attempt is None else (attempt.task, attempt.lease)


def active_ids(store: JobStore) -> set[str]:
    return {member.decode() for member in store._redis.smembers(store.keys.active)}


def test_a_task_runs_and_succeeds_once(store: JobStore) -> None:
    task_id = new_task(store)
    assert task_id in active_ids(store)
    task, lease = begin(store, task_id)
    assert task["status"] == TaskStatus.RUNNING
    done = succeed(store, lease)
    assert done["status"] == TaskStatus.SUCCEEDED and task_id not in active_ids(store)
    # A redelivered message for a finished task does nothing.
    assert begin(store, task_id) is None
    assert store.get(task_id) == done
    # And a finished task never goes back.
    with pytest.raises(InvalidTransition):
        store.schedule_retry(lease, JobError("x", retryable=True), delay=1)


def succeed(store: JobStore, lease: Lease) -> TaskRecord:
    return store.succeed(lease, outputs=[], text=[], usage=None, upstream_status=200)


def test_a_closing_write_sent_again_finds_itself_applied(store: JobStore) -> None:
    """A worker whose closing write was applied but whose answer it never got (a connection cut, a
    replica that did not confirm in time) sends it again: it is recognised as its own, changes nothing,
    counts nothing twice, and is not refused."""
    from services import clock
    from services.keys import Keys

    usage_key = Keys("store-test").tenant_usage("default", clock.day())
    for close in (
        lambda lease: succeed(store, lease),
        lambda lease: store.fail(lease, JobError("no", code="upstream_bad_request")),
        lambda lease: store.schedule_retry(lease, JobError("again", retryable=True), delay=60),
    ):
        task_id = new_task(store)
        _, lease = begin(store, task_id)
        first = close(lease)
        counts, events = (
            store._redis.hgetall(usage_key),
            store._redis.lrange(store.keys.events(task_id), 0, -1),
        )
        assert close(lease) == first == store.get(task_id)
        assert store._redis.hgetall(usage_key) == counts, "counted once"
        assert store._redis.lrange(store.keys.events(task_id), 0, -1) == events, "one event per change"
    # another holder's write is still refused: the attempt is not its own
    task_id = new_task(store)
    _, lease = begin(store, task_id)
    succeed(store, lease)
    with pytest.raises(InvalidTransition):
        succeed(store, Lease(task_id, "someone-else:00", LEASE, attempt=1))


def test_a_queued_task_cannot_succeed_without_running(store: JobStore) -> None:
    with pytest.raises(InvalidTransition):
        succeed(store, Lease(new_task(store), "made-up", LEASE, attempt=1))


def test_a_live_lease_keeps_a_second_delivery_out(store: JobStore) -> None:
    task_id = new_task(store)
    first = begin(store, task_id)
    assert first is not None
    assert begin(store, task_id) is None, "one attempt at a time"
    assert len(store.get(task_id)["attempts"]) == 1


def test_an_expired_lease_is_taken_over_and_the_old_holder_is_locked_out(store: JobStore) -> None:
    task_id = new_task(store)
    _, old_lease = begin(store, task_id, lease=0.2)
    assert wait_until(lambda: store.claim_expired_leases(LEASE) == [task_id], timeout=5, what="lease expiry")
    assert store.claim_expired_leases(LEASE) == [], "claimed by one sweeper only"
    task, _ = begin(store, task_id)
    assert [(a["outcome"], a["error_code"]) for a in task["attempts"]] == [
        ("worker_lost", "worker_lost"),
        (None, None),
    ]
    with pytest.raises(LeaseLost):
        store.fail(old_lease, JobError("late"))
    assert not store.renew_lease(old_lease)


def test_a_stale_worker_records_nothing_once_another_attempt_started(store: JobStore) -> None:
    """Worker A's lease expires (a long pause, a cut-off host); worker B takes the task over and calls
    the upstream. A's late writes, however they close its attempt, are refused and change nothing."""
    task_id = new_task(store)
    _, stale = begin(store, task_id, lease=0.2)
    assert wait_until(lambda: store.claim_expired_leases(LEASE) == [task_id], timeout=5, what="lease expiry")
    _, current = begin(store, task_id)
    before = store.get(task_id)
    for late_write in (
        lambda: succeed(store, stale),
        lambda: store.fail(stale, JobError("late")),
        lambda: store.schedule_retry(stale, JobError("late", retryable=True), delay=0),
        lambda: store.save_result(stale, b"a stale answer"),
    ):
        with pytest.raises(LeaseLost):
            late_write()
        assert store.get(task_id) == before, "a refused write leaves no trace"
    assert store._redis.get(store.keys.result(task_id)) is None
    done = succeed(store, current)
    assert [a["outcome"] for a in done["attempts"]] == ["worker_lost", "succeeded"]


def test_an_expired_lease_that_nobody_took_over_still_records_its_paid_answer(store: JobStore) -> None:
    """No other attempt started since: the answer A paid for is recorded, and the sweeper's message for
    the task then finds it final (it is not called again)."""
    task_id = new_task(store)
    _, lease = begin(store, task_id, lease=0.2)
    assert wait_until(lambda: store.claim_expired_leases(LEASE) == [task_id], timeout=5, what="lease expiry")
    assert succeed(store, lease)["status"] == TaskStatus.SUCCEEDED
    assert begin(store, task_id) is None


def test_a_task_out_of_attempts_fails_with_worker_lost(store: JobStore) -> None:
    task_id = new_task(store)
    begin(store, task_id, max_attempts=1, lease=0.1)
    assert wait_until(lambda: store.claim_expired_leases(LEASE), timeout=5, what="lease expiry")
    assert begin(store, task_id, max_attempts=1) is None
    task = store.get(task_id)
    assert task["status"] == TaskStatus.FAILED and task["error"]["code"] == "worker_lost"


def test_a_retry_waits_in_the_store_until_due(store: JobStore) -> None:
    task_id = new_task(store)
    _, lease = begin(store, task_id)
    task = store.schedule_retry(
        lease, JobError("busy", code="upstream_unavailable", retryable=True), delay=0.3
    )
    assert (
        task["status"] == TaskStatus.QUEUED and task["next_attempt_at"] > task["attempts"][0]["finished_at"]
    )
    assert store.claim_due_retries() == []
    assert wait_until(lambda: store.claim_due_retries() == [task_id], timeout=5, what="the retry to be due")
    assert store.claim_due_retries() == []


def test_lost_messages_are_claimed_once_they_are_old(store: JobStore) -> None:
    task_id = new_task(store)
    assert store.claim_lost_messages(older_than=60) == []
    # older_than=0 is at least 1 ms (clock.ms floors durations at 1 ms): a task created in the same
    # millisecond is not claimed yet, so ask until it is a millisecond old.
    assert wait_until(
        lambda: store.claim_lost_messages(older_than=0) == [task_id], timeout=5, what="the message to be old"
    )
    assert store.claim_lost_messages(older_than=1) == [], "re-claimed only after another wait"


def test_a_message_a_worker_holds_waiting_for_a_slot_is_not_taken_for_lost(store: JobStore) -> None:
    """A worker waiting for an upstream slot holds the task's message; it says so every lease interval,
    and the sweeper leaves the task alone. Once nobody says so, the message counts as lost again."""
    held, other = new_task(store), new_task(store)
    queued = store.keys.queued
    old = int(store._redis.zscore(queued, held)) - 60_000
    store._redis.zadd(queued, {held: old, other: old})  # both enqueued a minute ago
    assert store.hold_messages([held, "not-a-queued-task"], lease_seconds=LEASE) == [True, True]
    assert store.claim_lost_messages(older_than=30) == [other]
    assert not store._redis.zscore(queued, "not-a-queued-task"), "only queued tasks are touched"
    store._redis.zadd(queued, {held: old})  # then its worker went quiet
    assert store.claim_lost_messages(older_than=30) == [held]


def test_a_recovered_task_whose_message_a_worker_holds_is_not_sent_again(store: JobStore) -> None:
    """The sweeper sent a task again after its worker died (its lease expired). The worker that got that
    message waits for a slot before it can start the attempt; while it says it holds the message, the
    task's deadline stays ahead and the sweeper does not send a third message. Once it stops saying so,
    the task is recovered again a lease later."""
    task_id = new_task(store)
    begin(store, task_id, lease=0.1)
    assert wait_until(lambda: store.claim_expired_leases(0.2) == [task_id], timeout=5, what="lease expiry")
    store.hold_messages([task_id], lease_seconds=60)  # the new message's worker waits for a slot
    deadline = store._redis.zscore(store.keys.running, task_id)
    assert deadline > store._now_ms() + 50_000, "held a lease (60 s) ahead"
    store._redis.zadd(store.keys.running, {task_id: store._now_ms() - 1})  # as if that time had passed
    store.hold_messages([task_id], lease_seconds=60)  # the worker's next renewal pass
    assert store.claim_expired_leases(LEASE) == [], "not sent again while held"
    store._redis.zadd(store.keys.running, {task_id: store._now_ms() - 1})  # its worker went quiet
    assert store.claim_expired_leases(LEASE) == [task_id]


def test_holding_a_message_leaves_a_later_deadline_alone(store: JobStore) -> None:
    task_id = new_task(store)
    begin(store, task_id, lease=120)
    deadline = store._redis.zscore(store.keys.running, task_id)
    store.hold_messages([task_id], lease_seconds=1)
    assert store._redis.zscore(store.keys.running, task_id) == deadline


def test_rate_limited_attempts_are_free(store: JobStore) -> None:
    task_id = new_task(store)
    for _ in range(3):
        _, lease = begin(store, task_id, max_attempts=1)
        store.schedule_retry(lease, JobError("429", code="upstream_rate_limited", retryable=True), delay=0)
        assert store.claim_due_retries() == [task_id]
    assert begin(store, task_id, max_attempts=1) is not None


def test_saved_result_lives_until_the_task_is_final(store: JobStore) -> None:
    task_id = new_task(store)
    _, lease = begin(store, task_id)
    store.save_result(lease, b"answer")
    assert store._redis.get(store.keys.result(task_id)) == b"answer"
    succeed(store, lease)
    assert store._redis.get(store.keys.result(task_id)) is None


def test_webhook_events_are_written_with_the_change(store: JobStore) -> None:
    task_id = new_task(store, webhook={"url": "http://x.test/", "events": ["running", "succeeded"]})
    _, lease = begin(store, task_id)
    succeed(store, lease)
    client = store._redis
    due = [member.decode() for member in client.zrange(store.keys.webhooks_due, 0, -1)]
    assert due == [f"msg_{task_id}_running", f"msg_{task_id}_succeeded"]


def test_unknown_task(store: JobStore) -> None:
    with pytest.raises(NotFound):
        store.get("nope")
    with pytest.raises(NotFound):
        begin(store, "nope")


def test_a_lease_whose_key_outlives_its_deadline_is_claimed_when_the_key_expires(store: JobStore) -> None:
    task_id = new_task(store)
    begin(store, task_id)
    client = store._redis
    client.zadd(store.keys.running, {task_id: 0})  # the deadline in the set ran ahead of the key
    client.pexpire(store.keys.lease(task_id), 300)
    assert store.claim_expired_leases(LEASE) == [], "its lease is still held"
    assert 0 < client.zscore(store.keys.running, task_id) - time.time() * 1000 <= 301
    claimed = wait_until(lambda: store.claim_expired_leases(LEASE) == [task_id], timeout=5, what="expiry")
    assert claimed
    task, _ = begin(store, task_id)
    assert [a["outcome"] for a in task["attempts"]] == ["worker_lost", None]


def test_cancel_a_queued_or_running_task_but_not_a_final_one(store: JobStore) -> None:
    queued = new_task(store, webhook={"url": "http://x.test/", "events": ["canceled"]})
    assert store.cancel(queued)["status"] == TaskStatus.CANCELED
    assert queued not in active_ids(store) and begin(store, queued) is None, "its message does nothing"
    due = [member.decode() for member in store._redis.zrange(store.keys.webhooks_due, 0, -1)]
    assert f"msg_{queued}_canceled" in due

    running = new_task(store)
    _, lease = begin(store, running)
    canceled = store.cancel(running)
    assert [a["outcome"] for a in canceled["attempts"]] == ["canceled"]
    with pytest.raises((LeaseLost, InvalidTransition)):
        store.fail(lease, JobError("late"))
    with pytest.raises(InvalidTransition):
        succeed(store, lease)
    with pytest.raises(InvalidTransition) as again:
        store.cancel(running)
    assert again.value.message == f"task {running} is already canceled (final)"
    assert again.value.code == "invalid_transition"
    _, lease = begin(store, done := new_task(store))
    succeed(store, lease)
    with pytest.raises(InvalidTransition, match=rf"^task {done} is already succeeded \(final\)$"):
        store.cancel(done)


def test_a_script_is_called_with_every_key_it_declares_and_nothing_else(store: JobStore) -> None:
    script = Script(store._redis, "return {KEYS[1], ARGV[1], KEYS[2], ARGV[2]}", keys=["a"], args=["x"],
                    more_keys="rest", more_args="items")  # fmt: skip
    assert script(a="k1", x="v1", rest=["k2"], items=["v2"]) == [b"k1", b"v1", b"k2", b"v2"]
    with pytest.raises(TypeError):
        script(x="v1")  # a key left out: nothing is sent
    with pytest.raises(TypeError):
        script(a="k1", x="v1", b="k3")  # a key the script does not declare


def test_a_sweeper_whose_clock_runs_ahead_claims_nothing_early(
    store: JobStore, clock_ahead: Callable[[float], None]
) -> None:
    """Due retries, deadlines and lost messages are claimed on Redis's clock: a sweeper on a host ten
    minutes ahead neither runs a retry early, nor cancels a task before its Cancel-After, nor resends
    the message of a task queued a moment ago. (Leases: ``test_partition``.)"""
    retried = new_task(store)
    _, lease = begin(store, retried)
    store.schedule_retry(lease, JobError("again", retryable=True), delay=60)
    store.create(model="m", payload=b"{}", metadata=None, cancel_after=60)
    clock_ahead(600)
    assert store.claim_due_retries() == []
    assert store.claim_past_deadlines() == []
    assert store.claim_lost_messages(older_than=30) == []


def test_a_stray_message_does_not_start_a_retry_before_it_is_due(store: JobStore) -> None:
    """A duplicate message (two relays of the outbox, a resend) for a task waiting for its retry finds
    nothing to run until the sweeper finds the retry due; then it runs."""
    task_id = new_task(store)
    _, lease = begin(store, task_id)
    store.schedule_retry(lease, JobError("again", retryable=True), delay=0.3)
    assert begin(store, task_id) is None, "not due yet"
    assert store.get(task_id)["status"] == TaskStatus.QUEUED and len(store.get(task_id)["attempts"]) == 1
    wait_until(lambda: store.claim_due_retries() == [task_id], timeout=5, what="the retry due")
    task, _ = begin(store, task_id)
    assert task["status"] == TaskStatus.RUNNING and len(task["attempts"]) == 2
