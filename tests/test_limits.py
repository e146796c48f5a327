"""services.limits.UpstreamLimiter on a real Redis: the concurrency cap, slot expiry and renewal, the shared
cooldown, and the token bucket.

Each limiter has a Redis client of its own, as the worker processes sharing a limiter would. Times are
tenths of seconds; waits are asserted from below only (a loaded machine makes them longer, never
shorter), and where a test must wait for something it polls with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from devstack.processes import wait_until
from services.errors import Deferred
from services.keys import Keys
from services.leases import LeaseKeeper
from services.limits import LimiterSettings, UpstreamLimiter

KEYS = Keys("limit-test")

MakeLimiter = Callable[..., UpstreamLimiter]


@pytest.fixture
def make_limiter(redis_client: redis.Redis, redis_server: str) -> Iterator[MakeLimiter]:
    """Limiters sharing the (flushed) test Redis, each on its own client."""
    clients: list[redis.Redis] = []

    def make(
        *,
        max_concurrency: int = 0,
        rate_per_minute: float = 0.0,
        hold_seconds: float = 30.0,
        max_wait_in_thread: float = 0.0,
    ) -> UpstreamLimiter:
        client = redis.Redis.from_url(redis_server, socket_timeout=10)
        clients.append(client)
        settings = LimiterSettings(max_concurrency, rate_per_minute, hold_seconds, max_wait_in_thread)
        return UpstreamLimiter(client, KEYS, settings)

    yield make
    for client in clients:
        client.close()


def acquired(limiter: UpstreamLimiter, token: str) -> bool:
    """Whether ``token`` got a slot now (False: the limiter deferred it)."""
    try:
        limiter.acquire(token)
    except Deferred:
        return False
    return True


def deferral(limiter: UpstreamLimiter, token: str) -> float:
    """The delay the limiter defers ``token`` by; fails the test if it gives a slot instead."""
    with pytest.raises(Deferred) as info:
        limiter.acquire(token)
    return info.value.delay


# ---------------------------------------------------------------- the concurrency cap


def test_the_cap_holds_across_tokens_and_processes(make_limiter: MakeLimiter) -> None:
    one, two = make_limiter(max_concurrency=3), make_limiter(max_concurrency=3)
    one.acquire("a")
    two.acquire("b")
    one.acquire("c")
    assert deferral(two, "d") > 0
    assert deferral(one, "e") > 0


def test_a_caller_over_the_cap_waits_in_its_thread_until_a_slot_is_released(
    make_limiter: MakeLimiter,
) -> None:
    holder = make_limiter(max_concurrency=1)
    waiter = make_limiter(max_concurrency=1, max_wait_in_thread=30)
    holder.acquire("a")
    done = threading.Event()
    errors: list[BaseException] = []

    def wait_for_a_slot() -> None:
        try:
            waiter.acquire("b")
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=wait_for_a_slot, daemon=True)
    thread.start()
    assert not done.wait(0.3), "all slots are busy: the caller waits"
    holder.release("a")
    assert done.wait(10), "a released slot is taken by the waiting caller"
    thread.join(5)
    assert errors == []
    assert deferral(holder, "c") > 0, "and it holds it now"


def test_release_frees_a_slot(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=2)
    limiter.acquire("a")
    limiter.acquire("b")
    assert not acquired(limiter, "c")
    limiter.release("a")
    assert acquired(limiter, "c")
    assert not acquired(limiter, "d")
    limiter.release("nobody")  # releasing a slot one does not hold changes nothing
    assert not acquired(limiter, "d")


def test_a_slot_whose_holder_stopped_renewing_expires_after_hold_seconds(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=1, hold_seconds=0.4)
    began = time.monotonic()
    limiter.acquire("crashed")
    assert not acquired(limiter, "next")
    wait_until(lambda: acquired(limiter, "next"), timeout=10, what="the unrenewed slot to expire")
    assert time.monotonic() - began >= 0.35
    assert not limiter.renew("crashed"), "an expired slot that was taken is gone for good"


def test_renew_keeps_a_slot_past_hold_seconds(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=1, hold_seconds=1.0)
    other = make_limiter(max_concurrency=1, hold_seconds=1.0)
    keeper = LeaseKeeper(0.1)
    renewals: list[bool] = []
    taken_by_other: list[bool] = []

    def renew(tokens: Sequence[str]) -> list[bool]:
        renewals.extend(limiter.renew_slots(tokens))
        return [True] * len(tokens)

    def renewed_long_enough() -> bool:
        if acquired(other, "other"):
            taken_by_other.append(True)
            return True
        return len(renewals) >= 25  # 2.5 holds

    limiter.acquire("holder")
    try:
        with keeper.keep("upstream slot holder", renew, "holder"):
            wait_until(renewed_long_enough, timeout=30, what="25 renewals")
    finally:
        keeper.stop()
    assert taken_by_other == [], "a renewed slot is never taken"
    assert renewals.count(True) >= 20, renewals
    wait_until(lambda: acquired(other, "other"), timeout=10, what="the slot to expire once not renewed")


def test_renewing_twice_in_the_same_millisecond_still_holds_the_slot(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=1, hold_seconds=1.0)
    limiter.acquire("holder")
    assert all(limiter.renew("holder") for _ in range(200)), "an unchanged expiry is still a held slot"


def test_many_slots_are_renewed_in_one_call_each_answered(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=3, hold_seconds=1.0)
    limiter.acquire("a")
    limiter.acquire("c")
    assert limiter.renew_slots(["a", "b", "c"]) == [True, False, True], "b holds none"
    assert make_limiter(max_concurrency=0).renew_slots(["x", "y"]) == [True, True], "no cap: nothing to lose"


def test_renewing_a_slot_one_does_not_hold(make_limiter: MakeLimiter) -> None:
    assert not make_limiter(max_concurrency=1).renew("nobody")
    assert make_limiter(max_concurrency=0).renew("nobody"), "without a cap there is nothing to lose"


# ---------------------------------------------------------------- the shared cooldown


def test_the_cooldown_makes_every_caller_defer_or_wait_at_least_its_time(make_limiter: MakeLimiter) -> None:
    told = make_limiter()
    began = time.monotonic()
    told.cool_down(0.6)
    assert 0 < deferral(make_limiter(), "a") <= 0.6, "another process defers by what is left of it"
    make_limiter(max_wait_in_thread=30).acquire("b")  # one that may wait, waits it out
    assert time.monotonic() - began >= 0.55
    assert acquired(make_limiter(), "c"), "and once it is over, nobody waits"


def test_the_cooldown_comes_before_free_slots(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_concurrency=5)
    limiter.cool_down(0.3)
    assert not acquired(limiter, "a")
    wait_until(lambda: acquired(limiter, "a"), timeout=10, what="the cooldown to end")
    limiter.acquire("b")  # the deferred caller held no slot meanwhile


def test_a_shorter_cooldown_does_not_cut_a_longer_one(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    limiter.cool_down(30)
    limiter.cool_down(0.1)
    assert deferral(limiter, "a") > 29


# ---------------------------------------------------------------- the token bucket


def immediate_calls(limiter: UpstreamLimiter, most: int = 100) -> tuple[int, float]:
    """How many calls get through at once from here, and how long asking took."""
    began = time.monotonic()
    count = 0
    while count < most and acquired(limiter, f"t{count}"):
        count += 1
    return count, time.monotonic() - began


@pytest.mark.parametrize(("rate", "burst"), [(600, 10), (120, 2), (30, 1), (6, 1)])
def test_the_burst_is_one_seconds_worth_and_at_least_one(
    make_limiter: MakeLimiter, rate: int, burst: int
) -> None:
    count, took = immediate_calls(make_limiter(rate_per_minute=rate))
    # The bucket refills as we ask: a slow machine may let through what refilled meanwhile.
    assert burst <= count <= burst + int(took * rate / 60) + 1


def test_an_empty_bucket_defers_by_the_time_to_the_next_token(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(rate_per_minute=30)  # one call every 2 s
    limiter.acquire("a")
    assert 1.0 < deferral(make_limiter(rate_per_minute=30), "b") <= 2.0, "shared by every process"


def test_the_bucket_spaces_calls_at_its_rate(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(rate_per_minute=240, max_wait_in_thread=30)  # 4 a second, a burst of 4
    began = time.monotonic()
    for number in range(8):
        limiter.acquire(f"t{number}")
    # The 8th call needs 4 more tokens than the burst: a second's refill at the least.
    assert time.monotonic() - began >= 0.95


def test_an_idle_bucket_fills_up_to_its_burst_only(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(rate_per_minute=600)  # 10 a second, a burst of 10
    immediate_calls(limiter)
    time.sleep(1.5)  # not a synchronisation: the idle time the bucket refills over
    count, took = immediate_calls(limiter)
    assert 10 <= count <= 10 + int(took * 10) + 1, "idle for 1.5 s, the bucket holds 10 tokens, not 15"


def test_no_cap_and_no_rate_let_every_call_through(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    for number in range(50):
        limiter.acquire(f"t{number}")
    limiter.release("t0")
    assert limiter.renew("t1")


def test_a_worker_whose_clock_runs_ahead_takes_no_one_elses_slot(
    make_limiter: MakeLimiter, clock_ahead: Callable[[float], None]
) -> None:
    """Slots, cooldowns and the bucket are on Redis's clock: a worker on a host ten minutes ahead does
    not see the others' slots as expired, nor their cooldown as over."""
    limiter = make_limiter(max_concurrency=1)
    assert acquired(limiter, "on-time")
    limiter.cool_down(30)
    clock_ahead(600)
    assert deferral(limiter, "ahead") > 20, "the cooldown still holds"
    limiter._redis.delete(KEYS.limiter_cooldown)
    assert not acquired(limiter, "ahead"), "the other's slot still holds"
    assert limiter.renew("on-time")


def test_a_process_full_of_waiters_polls_for_a_slot_one_thread_at_a_time(
    make_limiter: MakeLimiter, redis_client: redis.Redis
) -> None:
    """50 threads waiting for a busy cap ask Redis about as often as one would: the others queue on the
    process's lock (a worker of 2,000 threads polling together starved its lease keeper)."""
    holder = make_limiter(max_concurrency=1)
    holder.acquire("holder")
    waiting = make_limiter(max_concurrency=1, max_wait_in_thread=1.0)

    def calls() -> int:
        stats = redis_client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    before = calls()
    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(lambda n: acquired(waiting, f"waiter{n}"), range(50)))
    asked = calls() - before
    assert outcomes == [False] * 50, "the slot stayed busy: every waiter was deferred"
    # each thread asks once on arrival; then one poller at a time, every 5 to 100 ms for about 1 s
    assert asked <= 50 + 80, f"{asked} polls: the waiters polled together"


def test_waiters_queued_behind_the_poller_each_get_the_slot_in_turn(make_limiter: MakeLimiter) -> None:
    holder = make_limiter(max_concurrency=1)
    holder.acquire("holder")
    waiting = make_limiter(max_concurrency=1, max_wait_in_thread=20.0)
    got: list[str] = []

    def wait_then_hand_on(token: str) -> None:
        waiting.acquire(token)
        got.append(token)
        waiting.release(token)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(wait_then_hand_on, f"waiter{n}") for n in range(3)]
        holder.release("holder")
        for future in futures:
            future.result(timeout=30)
    assert sorted(got) == ["waiter0", "waiter1", "waiter2"]
