"""What the fault tests share: their stack's settings, submitting, waiting for the end, and reading who
ran what (the store's attempts) against what the upstream saw (the simulator's call log)."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from devstack.processes import wait_until
from services.clock import parse_iso
from tests.stack import BROKERS, FINAL, Stack, directive_key, with_directive

# A fault test that matters on both brokers runs once on Redis, once on RabbitMQ (``fault_stack``); its
# row names the broker (``on_broker``).
both_brokers = pytest.mark.parametrize("fault_stack", BROKERS, indirect=True)


def on_broker(stack: Stack, fault: str) -> str:
    """A fault row's description, with the broker it ran on."""
    return f"{fault} [{stack.broker}]"


LEASE = 3.0
# Two tenants: every fault test submits as each in turn (``Stack.submit``), so the promises are shown
# with tenant isolation, per-tenant bookkeeping and fair-share admission in the path.
FAULT_ENV = {
    "TASK_LEASE_SECONDS": str(LEASE),
    "WORKER_CONCURRENCY": "60",
    "UPSTREAM_TIMEOUT": "5",
    "API_KEYS": "fault-a:fault-key-a,fault-b:fault-key-b",
}


def submit_many(stack: Stack, bodies: list[dict[str, Any]]) -> list[str]:
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(stack.submit, bodies))
    assert all(response.status_code == 202 for response in responses), [r.text for r in responses[:3]]
    return [response.json()["id"] for response in responses]


def settle(stack: Stack, ids: list[str], timeout: float = 90) -> tuple[dict[str, dict], int, int]:
    """Wait for every task to be final; return the tasks, how many were lost (404) and stuck."""
    deadline = time.monotonic() + timeout
    tasks: dict[str, dict] = {}
    lost = 0
    while time.monotonic() < deadline:
        tasks, lost = {}, 0
        for task_id in ids:
            response = stack.get_task(task_id)
            if response.status_code == 404:
                lost += 1
            else:
                tasks[task_id] = response.json()
        if all(task["status"] in FINAL for task in tasks.values()):
            break
        time.sleep(0.2)
    stuck = sum(1 for task in tasks.values() if task["status"] not in FINAL)
    if stuck or lost:
        print(stack.logs())
    return tasks, lost, stuck


def settle_succeeded(stack: Stack, ids: list[str], timeout: float = 90) -> dict[str, dict]:
    """Wait for every task to be final, and assert the promise: none lost, none stuck, all succeeded;
    and that the store's bookkeeping holds nothing of them any more."""
    tasks, lost, stuck = settle(stack, ids, timeout)
    assert (lost, stuck) == (0, 0), f"{lost} lost, {stuck} stuck"
    if any(task["status"] != "succeeded" for task in tasks.values()):
        print(stack.logs())
    assert_all_succeeded(tasks)
    assert_bookkeeping_empty(stack)
    return tasks


def assert_bookkeeping_empty(stack: Stack, timeout: float = 30) -> None:
    """Once every task of the stack is final, no set of the store or of admission holds one: nothing
    left admitted (which would shrink the window for ever), waiting, running or unfinished for a tenant.
    Polled: a submission that got no answer (Redis killed under it) may have stored a task all the same,
    which finishes on its own a little later."""
    client, keys = stack.runtime.redis, stack.runtime.keys
    tenants = [*stack.tenant_keys, "default"]

    def sizes() -> dict[str, int]:
        found = {
            "active": client.scard(keys.active),
            "queued": client.zcard(keys.queued),
            "delayed": client.zcard(keys.delayed),
            "running": client.zcard(keys.running),
            "admitted": client.zcard(keys.admitted),
            **{f"{tenant} unfinished": client.scard(keys.tenant_active(tenant)) for tenant in tenants},
            **{f"{tenant} waiting": client.zcard(keys.tenant_ready(tenant)) for tenant in tenants},
            **{f"{tenant} admitted": client.zcard(keys.tenant_admitted(tenant)) for tenant in tenants},
        }
        return {name: size for name, size in found.items() if size}

    try:
        wait_until(lambda: not sizes(), timeout=timeout, what="the bookkeeping to hold nothing")
    except TimeoutError:
        raise AssertionError(f"left in the bookkeeping: {sizes()}") from None


def assert_all_succeeded(tasks: dict[str, dict]) -> None:
    failed = [task for task in tasks.values() if task["status"] != "succeeded"]
    assert not failed, f"{len(failed)} task(s) did not succeed, e.g. {failed[0]}"


def calls_by_key(stack: Stack) -> dict[str, int]:
    return stack.sim_stats()["by_key"]


def slow_bodies(count: int, delay_ms: int, **directive: str) -> list[dict[str, Any]]:
    return [with_directive(delay_ms=str(delay_ms), **directive) for _ in range(count)]


def attempt_pid(attempt: dict[str, Any]) -> int:
    """The process that ran an attempt: the store records its ``worker`` as host:pid:thread."""
    return int(attempt["worker"].rsplit(":", 2)[1])


def task_ids_by_key(bodies: list[dict[str, Any]], ids: list[str]) -> dict[str, str]:
    return {directive_key(body): task_id for body, task_id in zip(bodies, ids, strict=True)}


def worker_holding_calls(
    stack: Stack, bodies: list[dict[str, Any]], ids: list[str], at_least: int
) -> tuple[str, int]:
    """Wait until ``at_least`` calls are in flight; return the generation worker that holds most of them,
    and how many it holds.

    Who holds a call: the simulator's call log names the task (by its directive key), and the task's open
    attempt names the process (its ``worker``). A worker can have tasks without a call in flight yet (its
    messages received, or its attempts recorded but their requests not sent), so readiness alone does not
    make any given worker the one to kill.
    """
    keys = task_ids_by_key(bodies, ids)
    workers = {child.pid: name for name, child in stack.children.items() if name.startswith("worker")}

    def busiest() -> tuple[str, int] | None:
        in_flight = [call for call in stack.sim_call_log() if call["finished"] is None]
        if len(in_flight) < at_least:
            return None
        held: Counter[str] = Counter()
        for call in in_flight:
            if call["key"] not in keys:
                continue
            attempts = stack.stored(keys[call["key"]])["attempts"]
            if attempts and attempts[-1]["finished_at"] is None and attempt_pid(attempts[-1]) in workers:
                held[workers[attempt_pid(attempts[-1])]] += 1
        return held.most_common(1)[0] if held else None

    return wait_until(busiest, timeout=30, what=f"{at_least} calls in flight, held by a worker")  # type: ignore[return-value]


def stored_attempts(stack: Stack, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    return {task_id: stack.stored(task_id)["attempts"] for task_id in ids}


def calls_by_task(stack: Stack, bodies: list[dict[str, Any]], ids: list[str]) -> dict[str, list[dict]]:
    keys = task_ids_by_key(bodies, ids)
    calls: dict[str, list[dict]] = {task_id: [] for task_id in ids}
    for call in stack.sim_call_log():
        if call["key"] in keys:
            calls[keys[call["key"]]].append(call)
    return calls


STAMP_SLACK = 0.002  # the store's timestamps are cut to milliseconds


def calls_without_an_attempt(calls: list[dict], attempts: list[dict[str, Any]]) -> list[dict]:
    """The calls of one task that no attempt accounts for (the product's promise: none).

    An attempt is recorded before its request is sent and closed after its answer, or when the next
    attempt finds its worker lost; each call is matched, in order, to a distinct attempt open when the
    call started. An attempt without a call is fine: its worker died between recording it and sending.
    """
    free = sorted(attempts, key=lambda attempt: attempt["number"])
    unmatched = []
    for call in sorted(calls, key=lambda call: call["started"]):
        match = next(
            (
                attempt
                for attempt in free
                if parse_iso(attempt["started_at"]).timestamp() - STAMP_SLACK <= call["started"]
                and (
                    attempt["finished_at"] is None
                    or call["started"] <= parse_iso(attempt["finished_at"]).timestamp() + STAMP_SLACK
                )
            ),
            None,
        )
        if match is None:
            unmatched.append(call)
        else:
            free.remove(match)
    return unmatched


def paid_twice(stack: Stack, bodies: list[dict[str, Any]]) -> int:
    """The fault report's "duplicate upstream calls", measured from the simulator's own call log: calls
    that produced an image (outcome ``ok``, whether or not the caller was still there to read it) beyond
    one per task. Refusals (429), errors and timeouts are not paid for and are not counted."""
    keys = {directive_key(body) for body in bodies}
    paid = Counter(
        call["key"] for call in stack.sim_call_log() if call["key"] in keys and call["outcome"] == "ok"
    )
    return sum(count - 1 for count in paid.values())
