"""services.leases.LeaseKeeper: renews every interval while a block runs, and only then; real leases of the
job store on the unit tests' Redis.

Time is measured with the keeper's own heartbeat where a test must let intervals pass: a second renewal
that only counts its calls (``Renewals``) is a clock that ticks at the keeper's pace, however loaded the
machine is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack

import pytest
import redis

from devstack.processes import wait_until
from services.errors import StoreUnavailable
from services.jobs import out_of_attempts
from services.leases import BATCH, LeaseKeeper, RenewMany
from services.store import JobStore, Lease

INTERVAL = 0.05


class Renewals:
    """A renewal that records when it is called and answers from a script: True, False or an error to
    raise, in order; True once the script is used up."""

    def __init__(self, *answers: bool | Exception) -> None:
        self._answers = list(answers)
        self._lock = threading.Lock()
        self.times: list[float] = []

    def __call__(self) -> bool:
        with self._lock:
            self.times.append(time.monotonic())
            answer = self._answers.pop(0) if self._answers else True
        if isinstance(answer, Exception):
            raise answer
        return answer

    def many(self, items: Sequence[object]) -> list[bool]:
        """As the keeper calls it: one call for the batch of holds registered with it."""
        return [self()] * len(items)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.times)


@pytest.fixture
def keeper() -> Iterator[LeaseKeeper]:
    keeper = LeaseKeeper(INTERVAL)
    yield keeper
    keeper.stop()


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, prefix="lease-test")


def started(store: JobStore, lease_seconds: float) -> Lease:
    task_id = store.create(model="m", payload=b"{}", metadata=None)["id"]
    attempt = store.start_attempt(
        task_id, worker="w", lease_seconds=lease_seconds, give_up=out_of_attempts(3)
    )
    assert attempt is not None
    return attempt.lease


def counted(renew_many: Callable[[Sequence[Lease]], list[bool]]) -> tuple[Renewals, RenewMany]:
    """``renew_many`` wrapped to count its calls."""
    calls = Renewals()

    def wrapper(leases: Sequence[Lease]) -> list[bool]:
        calls()
        return renew_many(leases)

    return calls, wrapper


def let_intervals_pass(clock: Renewals, intervals: int) -> None:
    """Wait until the keeper has called ``clock`` ``intervals`` more times."""
    target = clock.count + intervals
    wait_until(lambda: clock.count >= target, timeout=10, what=f"{intervals} more renewals")


def test_a_lease_lives_past_its_time_while_the_block_runs_and_expires_after(store: JobStore) -> None:
    keeper = LeaseKeeper(0.1)
    lease = started(store, lease_seconds=1.0)
    lease_key = store.keys.lease(lease.task_id)
    try:
        calls, renew = counted(store.renew_leases)
        began = time.monotonic()
        with keeper.keep(f"lease on task {lease.task_id}", renew, lease):
            wait_until(lambda: calls.count >= 15, timeout=20, what="15 renewals")
            assert time.monotonic() - began > 1.0, "15 intervals of 0.1 s outlast the 1 s lease"
            assert store._redis.exists(lease_key), "renewed, the lease is still held"
        assert all(b - a >= 0.1 * 0.5 for a, b in zip(calls.times, calls.times[1:], strict=False)), (
            "one renewal an interval, not a busy loop"
        )
        # Not renewed any more, it expires within its time.
        wait_until(lambda: not store._redis.exists(lease_key), timeout=10, what="the lease to expire")
        assert not store.renew_lease(lease)
    finally:
        keeper.stop()


def test_renewals_stop_when_the_block_ends(keeper: LeaseKeeper) -> None:
    clock = Renewals()
    renewals = Renewals()
    with keeper.keep("clock", clock.many, None):
        with keeper.keep("job", renewals.many, None):
            wait_until(lambda: renewals.count >= 3, timeout=10, what="3 renewals")
        after_block = renewals.count
        let_intervals_pass(clock, 5)
    # One renewal may already have been under way as the block ended; none starts after it.
    assert renewals.count <= after_block + 1


def test_a_renewal_that_finds_its_lease_gone_is_dropped_and_logged(
    keeper: LeaseKeeper, store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.leases")
    lease = started(store, lease_seconds=30)
    calls, renew = counted(store.renew_leases)
    clock = Renewals()
    with keeper.keep("clock", clock.many, None), keeper.keep(f"lease on task {lease.task_id}", renew, lease):
        wait_until(lambda: calls.count >= 1, timeout=10, what="a first renewal")
        store.cancel(lease.task_id)  # drops the lease: the next renewal finds it gone
        wait_until(
            lambda: f"lease on task {lease.task_id}: lost" in caplog.text, timeout=10, what="the loss logged"
        )
        dropped_at = calls.count
        let_intervals_pass(clock, 5)
        assert calls.count == dropped_at, "a lost lease is not renewed again"
        assert clock.count > 5, "the other renewals go on"
    lost = [r for r in caplog.records if r.getMessage().startswith(f"lease on task {lease.task_id}: lost")]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING


def test_a_false_renewal_is_dropped_and_logged_once(
    keeper: LeaseKeeper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.leases")
    renewals = Renewals(True, False)
    clock = Renewals()
    with keeper.keep("clock", clock.many, None), keeper.keep("upstream slot t", renewals.many, None):
        wait_until(lambda: renewals.count >= 2, timeout=10, what="two renewals")
        let_intervals_pass(clock, 5)
        assert renewals.count == 2
    assert [r.getMessage() for r in caplog.records] == [
        "upstream slot t: lost (expired before it was renewed)"
    ]


def test_a_service_error_is_retried_at_the_next_interval(
    keeper: LeaseKeeper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.leases")
    down = StoreUnavailable("the task store (Redis) is unavailable: test")
    renewals = Renewals(down, down, True)
    with keeper.keep("lease on task t", renewals.many, None):
        wait_until(lambda: renewals.count >= 5, timeout=10, what="renewals after the errors")
    messages = [r.getMessage() for r in caplog.records]
    assert (
        messages
        == ["lease on task t: could not renew (the task store (Redis) is unavailable: test); will try again"]
        * 2
    )
    first_error, retried = renewals.times[0], renewals.times[1]
    assert retried - first_error >= INTERVAL * 0.5, "retried an interval later, not at once"


def test_an_unexpected_error_in_one_renewal_does_not_stop_the_others(
    keeper: LeaseKeeper, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug (or a Redis reply nobody mapped) in one renewal must not kill the keeper's thread: every
    other lease in the process would silently stop being renewed."""
    caplog.set_level(logging.WARNING, logger="services.leases")
    broken = Renewals(RuntimeError("a bug"), True)
    clock = Renewals()
    with keeper.keep("clock", clock.many, None), keeper.keep("lease on task t", broken.many, None):
        wait_until(lambda: broken.count >= 3 and clock.count >= 3, timeout=10, what="renewals after the bug")
    assert "lease on task t: renewal failed unexpectedly; will try again" in caplog.text


def test_holds_of_one_kind_are_renewed_together_a_batch_a_round_trip(store: JobStore) -> None:
    """A worker holding thousands of calls renews them in a few round trips, not one each; a lost one
    among them is dropped and logged alone, and the kinds are renewed separately."""
    keeper = LeaseKeeper(3600)  # no pass of its own: renew_all below is the pass
    leases = [started(store, lease_seconds=30) for _ in range(BATCH + 2)]
    lost = leases[1]
    store.cancel(lost.task_id)  # drops its lease
    batches: list[int] = []

    def renew_leases(items: Sequence[Lease]) -> list[bool]:
        batches.append(len(items))
        return store.renew_leases(items)

    slots = Renewals()
    try:
        with ExitStack() as holds:
            for lease in leases:
                holds.enter_context(keeper.keep(f"lease on task {lease.task_id}", renew_leases, lease))
            holds.enter_context(keeper.keep("upstream slot t", slots.many, "t"))
            keeper.renew_all()
            assert sorted(batches) == [2, BATCH] and slots.count == 1
            ttl = store._redis.pttl(store.keys.lease(leases[-1].task_id))
            assert ttl > 29_000, "renewed to the full 30 s"
            keeper.renew_all()
            assert sorted(batches) == [1, 2, BATCH, BATCH], "the lost lease is renewed no more"
    finally:
        keeper.stop()


def test_a_hold_that_ended_is_not_a_loss(keeper: LeaseKeeper, caplog: pytest.LogCaptureFixture) -> None:
    """The job's closing write deletes its lease: a renewal that finds it gone after that lost nothing."""
    caplog.set_level(logging.WARNING, logger="services.leases")
    ended = threading.Event()
    ended.set()
    renewals = Renewals(False, False, False)
    with keeper.keep("lease on task t", renewals.many, None, ended=ended):
        wait_until(lambda: renewals.count >= 3, timeout=10, what="three renewals")
    assert caplog.records == []
