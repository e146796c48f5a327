"""Fault tests of takeovers: a worker that lost its task while alive (paused past its lease, or its lease
lapsed while it worked) records nothing and leaves no object behind; a task whose broker message was lost
is run by the sweeper. Every call the simulator logs has an attempt; the calls paid twice are exactly
those of the attempts another worker took over."""

from __future__ import annotations

import json
import signal
import time

import pytest

from devstack.processes import wait_until
from services.clock import parse_iso
from tests.fault_kit import (
    LEASE,
    attempt_pid,
    both_brokers,
    calls_by_task,
    calls_without_an_attempt,
    on_broker,
    paid_twice,
    settle_succeeded,
    slow_bodies,
    stored_attempts,
    submit_many,
    worker_holding_calls,
)
from tests.report import FaultRow, record
from tests.stack import Stack, directive_key

pytestmark = pytest.mark.timeout(240)


def refusals(stack: Stack, task_ids: list[str]) -> int:
    """How many of these tasks a stale worker has seen its result refused for (it logs each)."""
    logs = stack.worker_logs()
    return sum(f"task {task_id}: attempt 1's result is refused" in logs for task_id in task_ids)


def recorded_outputs(task: dict) -> list[tuple[str, str]]:
    """What a task's record says of its outputs (without the URLs, which are signed afresh per read)."""
    return [(output["key"], output["sha256"]) for output in task["outputs"]]


def check_takeovers(
    stack: Stack, bodies: list[dict], ids: list[str], victim_pid: int
) -> tuple[dict[str, dict], list[str]]:
    """The invariants after takeovers: every task succeeded, on its last attempt; every call has an
    attempt; the attempts found lost are the victim's; only taken-over tasks were paid twice, once each;
    the bucket holds only the recorded outputs. Returns the tasks and the ids of those taken over."""
    tasks = settle_succeeded(stack, ids)
    attempts = stored_attempts(stack, ids)
    taken_over = [
        task_id
        for task_id in ids
        if [a["outcome"] for a in attempts[task_id]] == ["worker_lost", "succeeded"]
    ]
    for task_id in ids:
        outcomes = [a["outcome"] for a in attempts[task_id]]
        assert outcomes in (["succeeded"], ["worker_lost", "succeeded"]), (task_id, attempts[task_id])
        assert all(attempt_pid(a) == victim_pid for a in attempts[task_id] if a["outcome"] == "worker_lost")
    calls = calls_by_task(stack, bodies, ids)
    for task_id in ids:
        assert not calls_without_an_attempt(calls[task_id], attempts[task_id]), (task_id, calls[task_id])
    return tasks, taken_over


@pytest.mark.stack(UPSTREAM_TIMEOUT="20")
def test_a_worker_paused_past_its_lease_records_nothing_when_it_resumes(fault_stack: Stack) -> None:
    """SIGSTOP the worker that holds calls; the other worker takes its tasks over after the lease and
    finishes them. SIGCONT: the paused worker reads its answers (paid), and every one is refused."""
    stack = fault_stack
    bodies = slow_bodies(20, 2500)
    ids = submit_many(stack, bodies)
    name, held = worker_holding_calls(stack, bodies, ids, 10)
    victim = stack.children[name]
    victim_pid = victim.pid
    victim.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        tasks, taken_over = check_takeovers(stack, bodies, ids, victim_pid)
        paused_for = time.monotonic() - stopped_at
    finally:
        victim.signal(signal.SIGCONT)
    assert taken_over, f"{name} held no task when it was paused"
    before = {task_id: recorded_outputs(tasks[task_id]) for task_id in ids}
    wait_until(
        lambda: refusals(stack, taken_over) == len(taken_over),
        timeout=60,
        what="the resumed worker to see its results refused",
    )
    after = {task_id: stack.task(task_id) for task_id in ids}
    assert all(recorded_outputs(after[task_id]) == before[task_id] for task_id in ids), "nothing overwritten"
    for task_id in ids:
        recorded = sorted(output["key"] for output in after[task_id]["outputs"])
        assert stack.output_objects(task_id) == recorded, "the stale uploads are deleted"
    duplicates = paid_twice(stack, bodies)
    assert duplicates == len(taken_over), "each task taken over is paid twice: its stale call is counted"
    record(
        FaultRow(
            "SIGSTOP the worker holding calls past its lease, then SIGCONT",
            len(ids),
            len(ids),
            0,
            0,
            duplicates,
            f"all done {paused_for:.1f}s after the pause (lease {LEASE:.0f}s)",
            note=f"{len(taken_over)} tasks taken over; each stale answer (paid) refused on resume, its "
            "upload deleted",
        )
    )


@pytest.mark.stack(UPSTREAM_TIMEOUT="20")
def test_a_lease_that_lapses_under_a_live_worker_is_taken_over_and_its_result_refused(
    fault_stack: Stack,
) -> None:
    """The worker holding calls stays alive, but its leases lapse (as when its renewals stall): the
    sweeper hands the tasks to a new attempt, and the live worker's late answers are refused."""
    stack = fault_stack
    bodies = slow_bodies(12, 6000)
    ids = submit_many(stack, bodies)
    name, held = worker_holding_calls(stack, bodies, ids, 6)
    victim_pid = stack.children[name].pid
    client, keys = stack.runtime.redis, stack.runtime.keys
    stalled = []
    for task_id in ids:
        attempts = stack.stored(task_id)["attempts"]
        if attempts and attempts[-1]["finished_at"] is None and attempt_pid(attempts[-1]) == victim_pid:
            client.pexpire(keys.lease(task_id), 1)  # the lease lapses: its renewals did not come in time
            stalled.append(task_id)
    assert stalled, f"{name} held no attempt"
    tasks, taken_over = check_takeovers(stack, bodies, ids, victim_pid)
    assert set(taken_over) <= set(stalled), "only the lapsed leases were taken over"
    assert taken_over, "a lapsed lease is taken over before the live worker's 6 s call answers"
    wait_until(
        lambda: refusals(stack, taken_over) == len(taken_over),
        timeout=60,
        what="the live worker to see its late results refused",
    )
    for task_id in ids:
        recorded = sorted(output["key"] for output in stack.task(task_id)["outputs"])
        assert stack.output_objects(task_id) == recorded, "the stale uploads are deleted"
    duplicates = paid_twice(stack, bodies)
    assert duplicates == len(taken_over)
    record(
        FaultRow(
            "leases lapse under a live worker with 6 s calls in flight",
            len(ids),
            len(ids),
            0,
            0,
            duplicates,
            f"{len(taken_over)} of {len(stalled)} lapsed leases taken over",
            note="the live worker's late answers (paid) are refused, its uploads deleted",
        )
    )


@both_brokers
def test_a_task_whose_message_was_lost_is_run_by_the_sweeper(fault_stack: Stack) -> None:
    """Tasks stored without their broker message (the broker lost its last writes): the sweeper finds
    them queued for longer than a lease while the queue is empty, and enqueues them again."""
    stack = fault_stack
    store = stack.runtime.store
    lost_bodies = slow_bodies(10, 100)
    created = time.time()
    lost_ids = [
        store.create(model=body["model"], payload=json.dumps(body).encode(), metadata=None, tenant="fault-a")[
            "id"
        ]
        for body in lost_bodies
    ]
    stack.owners.update(dict.fromkeys(lost_ids, "fault-a"))
    sent_bodies = slow_bodies(10, 100)
    ids = lost_ids + submit_many(stack, sent_bodies)
    tasks = settle_succeeded(stack, ids, timeout=60)
    assert all(len(tasks[task_id]["attempts"]) == 1 for task_id in ids)
    recovery = max(parse_iso(tasks[task_id]["started_at"]).timestamp() - created for task_id in lost_ids)
    assert recovery >= LEASE, "a queued task is not taken for lost before it waited a lease"
    assert recovery <= 2 * LEASE + 3, f"recovered after {recovery:.1f}s"
    calls = stack.sim_stats()["by_key"]
    assert all(calls[directive_key(body)] == 1 for body in lost_bodies + sent_bodies)
    duplicates = paid_twice(stack, lost_bodies + sent_bodies)
    record(
        FaultRow(
            on_broker(stack, "10 tasks stored without their broker message, 10 with"),
            len(ids),
            len(ids),
            0,
            0,
            duplicates,
            f"run {recovery:.1f}s after creation (lease {LEASE:.0f}s)",
            note="the sweeper found them queued with the broker's queue empty",
        )
    )
