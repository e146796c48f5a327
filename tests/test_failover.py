"""Redis failover under load: SIGKILL the primary of a Sentinel group while jobs are being submitted and
are in flight. No accepted (202) task is lost or stuck, no upstream call is paid twice but those in flight
when the primary died, the API answers 503 during the switch and 202 again seconds later.

The stack's Redis is a primary with two replicas and three sentinels (devstack/sentinel.py: quorum 2,
down after 3 s), every process configured with REDIS_SENTINELS; submissions are acknowledged only once a
replica holds them (REDIS_MIN_REPLICAS_ACK=1, services/replication.py). Two replicas, because with one
the failover leaves the new primary without any, and every submission would get 503 until one is back.

The submitters behave like the SDK: each request has an Idempotency-Key, kept on its retries, and is
sent again on a 503, a 409 ``idempotency_in_progress`` or a connection error.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.processes import wait_until
from devstack.sentinel import RedisGroup
from services.config import load_config
from services.errors import InvalidTransition, LeaseLost, StoreUnavailable
from services.redis_connection import redis_client
from services.replication import ReplicaAck
from services.store import JobStore, Lease
from tests.fault_kit import settle_succeeded
from tests.report import FaultRow, record
from tests.stack import Stack, directive_key, with_directive

pytestmark = pytest.mark.timeout(180)

SUBMITTERS = 4
CALL_MS = 800  # each upstream call: many are in flight when the primary dies
RECOVERY_LIMIT = 15.0  # seconds from the kill to the first 202 of a request sent after it


@dataclass
class Submissions:
    """What the submitters saw: accepted tasks and their bodies, and every answer with its time."""

    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # task id -> body
    answers: list[tuple[float, float, int | str]] = field(default_factory=list)  # sent, answered, status
    refusals: Counter[str] = field(default_factory=Counter)  # 503 messages, 409s, connection errors
    waits: list[float] = field(default_factory=list)  # per accepted request: first try to its 202, s
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted_after(self, moment: float) -> int:
        with self.lock:
            return sum(1 for sent, _, status in self.answers if sent > moment and status == 202)


def submit_until_accepted(stack: Stack, tenant: str, seen: Submissions, stop: threading.Event) -> None:
    """One request, sent again like a client would until it is accepted (or the test stops)."""
    body = with_directive(delay_ms=str(CALL_MS))
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    first_try = time.monotonic()
    while not stop.is_set():
        sent = time.monotonic()
        try:
            response = stack.submit(body, tenant=tenant, headers=headers, timeout=10)
        except httpx.HTTPError as exc:
            with seen.lock:
                seen.answers.append((sent, time.monotonic(), type(exc).__name__))
                seen.refusals[type(exc).__name__] += 1
            time.sleep(0.1)
            continue
        with seen.lock:
            seen.answers.append((sent, time.monotonic(), response.status_code))
            if response.status_code == 202:
                seen.accepted[response.json()["id"]] = body
                seen.waits.append(time.monotonic() - first_try)
                return
            code = response.json().get("error", {}).get("code")
            if response.status_code == 503 and code == "store_unavailable":
                seen.refusals["503 " + response.json()["error"]["message"].split(" (")[0][:60]] += 1
            elif response.status_code == 409 and code == "idempotency_in_progress":
                seen.refusals["409 idempotency_in_progress"] += 1
            else:
                seen.problems.append(f"{response.status_code}: {response.text[:200]}")
                return
        time.sleep(0.1)


@pytest.mark.stack(
    redis_replicas=2,
    REDIS_MIN_REPLICAS_ACK="1",
    TASK_LEASE_SECONDS="10",  # longer than the switch: a worker holding a paid answer records it after
    STORE_TIMEOUT="1",
)
def test_sigkill_the_redis_primary_under_load(fault_stack: Stack) -> None:
    stack = fault_stack
    group = stack.group
    assert group is not None
    seen = Submissions()
    stop = threading.Event()
    tenants = sorted(stack.tenant_keys)

    def submitter(number: int) -> None:
        while not stop.is_set():
            submit_until_accepted(stack, tenants[number % len(tenants)], seen, stop)

    threads = [threading.Thread(target=submitter, args=(number,)) for number in range(SUBMITTERS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(
            lambda: len(seen.accepted) >= 30 and stack.sim_stats()["in_flight"] >= 10,
            timeout=30,
            what="30 accepted tasks and 10 calls in flight",
        )
        primary = group.agreed_primary()
        assert primary == "redis-a", group.sentinel_views()
        kill_began = time.time()
        group.servers[primary].kill()
        killed_at, kill_ended = time.monotonic(), time.time()
        promoted = wait_until(
            lambda: (group.agreed_primary() or primary) != primary and group.agreed_primary(),
            timeout=30,
            what="the sentinels to agree on a new primary",
        )
        promoted_after = time.monotonic() - killed_at
        try:
            wait_until(lambda: seen.accepted_after(killed_at) >= 1, timeout=30, what="a 202 after the kill")
        except TimeoutError:
            raise AssertionError(f"no 202 after the kill; refused: {dict(seen.refusals)}") from None
        count = len(seen.accepted)
        wait_until(lambda: len(seen.accepted) >= count + 20, timeout=30, what="20 more accepted")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not seen.problems, seen.problems[:5]

    with seen.lock:
        after = sorted(
            (sent, answered, status) for sent, answered, status in seen.answers if sent > killed_at
        )
    first_202 = next(answered for _, answered, status in after if status == 202) - killed_at
    refused = [status for _, _, status in seen.answers if status != 202]
    assert refused, "the API refused submissions (503 or no connection) during the switch"
    assert any(status == 503 for _, _, status in after), "503 store_unavailable during the switch"
    assert first_202 <= RECOVERY_LIMIT, f"202 again only {first_202:.1f}s after the kill"

    accepted = list(seen.accepted)
    tasks = settle_succeeded(stack, accepted, timeout=90)  # none lost (404), none stuck, all succeeded

    # Paid calls per task, from the simulator's own log: a task paid twice must have had its call in
    # flight when the primary died (its answer then recorded nowhere: its worker lost it, e.g. exited by
    # kombu on the lost broker connection). A call that answered before the kill is never paid again: its
    # worker's closing write counts only once a replica holds it, and is sent again to the new primary
    # until one does (JobStore._write, closing).
    keys = {directive_key(body): task_id for task_id, body in seen.accepted.items()}
    calls = stack.sim_call_log()
    in_flight_at_kill = {
        call["key"]
        for call in calls
        if call["started"] <= kill_ended and (call["finished"] is None or call["finished"] >= kill_began)
    }
    paid = Counter(call["key"] for call in calls if call["key"] in keys and call["outcome"] == "ok")
    duplicates = {key: count - 1 for key, count in paid.items() if count > 1}
    beyond = {key: extra for key, extra in duplicates.items() if key not in in_flight_at_kill}
    assert not beyond, f"paid twice without a call in flight at the kill: {beyond}"
    assert all(paid[key] >= 1 for key in keys), "every accepted task's call was made"
    in_flight = len(in_flight_at_kill & keys.keys())
    record(
        FaultRow(
            "SIGKILL the Redis primary (Sentinel, 2 replicas, 3 sentinels) under load",
            len(accepted),
            sum(task["status"] == "succeeded" for task in tasks.values()),
            0,
            0,
            sum(duplicates.values()),
            f"202 again {first_202:.1f}s after the kill (new primary named at {promoted_after:.1f}s)",
            note=f"REDIS_MIN_REPLICAS_ACK=1; {promoted} promoted; {in_flight} calls in flight at the kill; "
            f"refused during the switch: {dict(seen.refusals)}; the longest a request waited for its 202 "
            f"(same Idempotency-Key): {max(seen.waits):.1f}s; worker restarts by the supervisor: "
            f"{sum(child.restarts for child in stack.children.values())}",
        )
    )


def test_calls_racing_failovers_fail_only_as_the_store_being_unavailable(tmp_path: Path) -> None:
    """Many threads write through the sentinel-managed client while the primary is killed, three times: each
    call succeeds, or fails as ``StoreUnavailable`` (what every caller handles), or is refused by the
    store (a write the failover lost); never inside redis-py on a connection closed under it (the race
    that ``services/redis_connection.py`` closes: once it failed a job with an internal error)."""
    group = RedisGroup(tmp_path / "redis", tmp_path).start(replicas=2)
    client = redis_client(load_config({**group.env(), "STORE_TIMEOUT": "1"}))
    writer = JobStore(client, prefix="race", replica_ack=ReplicaAck(1, timeout=0.5))
    done, unexpected = Counter[str](), list[str]()
    stop = threading.Event()

    def record(lease: Lease) -> None:
        """As a worker records a paid answer: again while the store is unavailable, for up to 10 s."""
        deadline = time.monotonic() + 10
        while True:
            try:
                writer.succeed(lease, outputs=[], text=[], usage=None, upstream_status=200)
                return
            except StoreUnavailable:
                done["StoreUnavailable"] += 1
                if time.monotonic() > deadline:
                    raise
                stop.wait(0.1)

    def work(number: int) -> None:
        while not stop.is_set():
            try:
                task = writer.create(model="m", payload=b"{}", metadata=None)
                attempt = writer.start_attempt(
                    task["id"], worker=f"w{number}", lease_seconds=30, give_up=lambda _: None
                )
                if attempt is not None:
                    stop.wait(0.05)  # the call: meanwhile its connection is idle in the pool
                    record(attempt.lease)
                done["ok"] += 1
            except (StoreUnavailable, LeaseLost, InvalidTransition) as exc:
                done[type(exc).__name__] += 1
            except Exception:  # what this test looks for
                unexpected.append(traceback.format_exc())

    def more_writes(count: int) -> Callable[[], bool]:
        return lambda: done["ok"] >= count + 200

    def another_primary(former: str) -> Callable[[], bool]:
        return lambda: (group.agreed_primary() or former) != former

    threads = [threading.Thread(target=work, args=(number,)) for number in range(60)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            wait_until(more_writes(done["ok"]), timeout=30, what="200 writes on the primary")
            primary = group.agreed_primary()
            assert primary is not None
            group.servers[primary].kill()
            wait_until(another_primary(primary), timeout=30, what="a new primary")
            wait_until(more_writes(done["ok"]), timeout=30, what="200 writes on the new one")
            group.restart(primary)
            wait_until(
                lambda: group.replicas_in_sync(group.agreed_primary() or "") == 2,
                timeout=30,
                what="the former primary back as a replica",
            )
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        client.close()
        group.stop()
    assert not unexpected, f"{len(unexpected)} call(s) failed inside redis-py, e.g.:\n{unexpected[0]}"
    assert done["StoreUnavailable"] > 0, "calls were made while there was no primary"
