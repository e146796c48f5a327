"""services.sweeper.Sweeper.tick() with a real JobStore: what it enqueues (due retries, through admission;
tasks whose lease expired, lost messages when the broker's queue is empty), and that each id is handed
out once.

The broker is a seam (``Broker``): what was enqueued, and the backlog the sweeper asks about.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
import redis

from devstack.processes import wait_until
from services.admission import Admission
from services.errors import JobError
from services.jobs import out_of_attempts
from services.leases import LeaseKeeper
from services.store import NO_LIMITS, JobStore, Lease, TaskStatus
from services.sweeper import Sweeper

LEASE = 30.0  # the sweeper's TASK_LEASE_SECONDS where a test does not wait for one


class Broker:
    """The sweeper's view of the broker: ``enqueue`` records, ``backlog`` answers ``depth``."""

    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self.sent: list[str] = []
        self.cut: list[str] = []  # canceled past their deadline: their calls to cut off
        self.asked = 0
        self._lock = threading.Lock()

    def enqueue(self, task_ids: Sequence[str]) -> None:
        with self._lock:
            self.sent.extend(task_ids)

    def cut_off(self, task_id: str) -> None:
        with self._lock:
            self.cut.append(task_id)

    def backlog(self) -> int:
        self.asked += 1
        return self.depth


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, prefix="sweep-test")


@pytest.fixture
def broker() -> Broker:
    return Broker()


def sweeper(store: JobStore, broker: Broker, lease_seconds: float = LEASE) -> Sweeper:
    """A sweeper whose admission and recovery both send to ``broker``."""
    admission = Admission(store._redis, store.keys, broker.enqueue, window=0, defaults=NO_LIMITS)
    return Sweeper(
        store,
        admission,
        broker.enqueue,
        broker.cut_off,
        broker.backlog,
        lease_seconds=lease_seconds,
        interval=0.05,
    )


def new_task(store: JobStore) -> str:
    return store.create(model="m", payload=b"{}", metadata=None)["id"]


def begin(store: JobStore, task_id: str, lease_seconds: float = LEASE) -> Lease:
    attempt = store.start_attempt(
        task_id, worker="w", lease_seconds=lease_seconds, give_up=out_of_attempts(5)
    )
    assert attempt is not None
    return attempt.lease


def retry_later(store: JobStore, delay: float) -> str:
    task_id = new_task(store)
    store.schedule_retry(begin(store, task_id), JobError("busy", code="upstream_unavailable"), delay=delay)
    return task_id


def ticked_until_enqueued(sweep: Sweeper, timeout: float = 10) -> list[str]:
    """The ids of the first tick that enqueues anything."""
    return wait_until(sweep.tick, timeout=timeout, what="the sweeper to enqueue")  # type: ignore[return-value]


def test_a_retry_is_enqueued_once_it_is_due(store: JobStore, broker: Broker) -> None:
    sweep = sweeper(store, broker)
    began = time.monotonic()
    task_id = retry_later(store, delay=0.4)
    assert sweep.tick() == []
    assert ticked_until_enqueued(sweep) == [task_id]
    assert time.monotonic() - began >= 0.35, "not before it is due"
    assert broker.sent == [task_id]
    assert sweep.tick() == [], "enqueued once"
    assert store.get(task_id)["status"] == TaskStatus.QUEUED


def test_a_task_whose_lease_expired_is_enqueued_once(store: JobStore, broker: Broker) -> None:
    sweep = sweeper(store, broker)
    task_id = new_task(store)
    begin(store, task_id, lease_seconds=1.0)
    assert sweep.tick() == [], "its lease is held"
    assert ticked_until_enqueued(sweep) == [task_id]
    assert not store._redis.exists(store.keys.lease(task_id))
    assert sweep.tick() == [], "claimed for a lease: not enqueued again meanwhile"
    assert broker.sent == [task_id]


def test_a_task_whose_lease_key_is_gone_is_enqueued_after_its_deadline(
    store: JobStore, broker: Broker
) -> None:
    sweep = sweeper(store, broker)
    task_id = new_task(store)
    began = time.monotonic()
    begin(store, task_id, lease_seconds=0.5)
    store._redis.delete(store.keys.lease(task_id))  # the lease is gone (a Redis that lost it, say)
    assert ticked_until_enqueued(sweep) == [task_id]
    assert time.monotonic() - began >= 0.45, "its deadline in the running set still counts"
    assert broker.sent == [task_id]


def test_a_renewed_lease_is_never_taken(store: JobStore, broker: Broker) -> None:
    sweep = sweeper(store, broker)
    task_id = new_task(store)
    lease = begin(store, task_id, lease_seconds=1.0)
    keeper = LeaseKeeper(0.1)
    renewals: list[bool] = []
    enqueued: list[str] = []

    def renew(leases: Sequence[Lease]) -> list[bool]:
        renewals.extend(store.renew_leases(leases))
        return renewals[-len(leases) :]

    def swept_for_two_and_a_half_leases() -> bool:
        enqueued.extend(sweep.tick())
        return bool(enqueued) or len(renewals) >= 25

    try:
        with keeper.keep(f"lease on task {task_id}", renew, lease):
            wait_until(swept_for_two_and_a_half_leases, timeout=30, what="25 renewals")
    finally:
        keeper.stop()
    assert enqueued == [] and all(renewals)
    assert ticked_until_enqueued(sweep) == [task_id], "once no longer renewed, it is taken"


def test_lost_messages_are_enqueued_only_when_the_broker_queue_is_empty(
    store: JobStore, broker: Broker
) -> None:
    lease = 1.0  # a queued task older than this whose queue is empty lost its message
    sweep = sweeper(store, broker, lease_seconds=lease)
    broker.depth = 3
    created = time.monotonic()
    task_id = new_task(store)
    enqueued: list[str] = []

    def swept_while_the_broker_is_busy() -> bool:
        enqueued.extend(sweep.tick())
        return time.monotonic() - created > 2 * lease and broker.asked >= 3

    wait_until(swept_while_the_broker_is_busy, timeout=30, what="sweeps while the broker is busy")
    assert enqueued == [], "a backlog means the message may still be on its way"

    broker.depth = 0
    fresh = new_task(store)
    assert ticked_until_enqueued(sweep) == [task_id], "the old one, not the one just created"
    assert sweep.tick() == [], "enqueued again only after another lease"
    assert broker.sent == [task_id]
    assert fresh not in broker.sent


def test_a_broker_backlog_does_not_hold_back_retries_or_expired_leases(
    store: JobStore, broker: Broker
) -> None:
    broker.depth = 10
    sweep = sweeper(store, broker)
    due = retry_later(store, delay=0)
    lost_worker = new_task(store)
    begin(store, lost_worker, lease_seconds=0.2)
    wait_until(
        lambda: not store._redis.exists(store.keys.lease(lost_worker)), timeout=10, what="the lease to expire"
    )
    enqueued: list[str] = []
    wait_until(lambda: enqueued.extend(sweep.tick()) or len(enqueued) >= 2, timeout=10, what="both")
    assert sorted(enqueued) == sorted([due, lost_worker])


def test_each_id_is_handed_out_once_across_two_sweepers(store: JobStore) -> None:
    lease = 2.0  # the sweepers': nothing they claim is due again within it
    retries = [retry_later(store, delay=0) for _ in range(30)]
    lost_workers = [new_task(store) for _ in range(15)]
    for task_id in lost_workers:
        begin(store, task_id, lease_seconds=0.1)
    lost_messages = [new_task(store) for _ in range(15)]
    created = time.monotonic()
    expected = retries + lost_workers + lost_messages
    lease_keys = [store.keys.lease(task_id) for task_id in lost_workers]
    wait_until(lambda: store._redis.exists(*lease_keys) == 0, timeout=10, what="the leases to expire")
    wait_until(lambda: time.monotonic() - created > lease, timeout=10, what="the messages to be old")

    brokers = [Broker(), Broker()]
    sweepers = [sweeper(store, broker, lease_seconds=lease) for broker in brokers]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def sweep(which: int) -> None:
        try:
            start.wait(5)
            deadline = time.monotonic() + 10
            while len(brokers[0].sent) + len(brokers[1].sent) < len(expected) and time.monotonic() < deadline:
                sweepers[which].tick()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=sweep, args=(which,), daemon=True) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert errors == []
    handed_out = brokers[0].sent + brokers[1].sent
    assert sorted(handed_out) == sorted(expected), "every id once, none twice"
    assert set(brokers[0].sent).isdisjoint(brokers[1].sent)
