"""The fault suite: kill workers, Redis, S3, and misbehave upstream; no accepted task is lost or stuck.

Each test runs its own real stack (redis-server, S3 server, simulator, ≥2 Celery worker processes, the
API) on free ports, submits work, breaks something, and at the end checks every accepted (202) task:
final, with the right outcome, and the upstream calls the simulator itself counted. Each test adds a
row to the fault report printed at the end of the run (tests/conftest.py).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.processes import start_s3, wait_until
from services.clock import parse_iso
from services.storage import Storage
from tests.report import FaultRow, record
from tests.stack import FINAL, Stack, directive_key, running_stack, with_directive

LEASE = 3.0
FAULT_ENV = {"TASK_LEASE_SECONDS": str(LEASE), "WORKER_CONCURRENCY": "60", "UPSTREAM_TIMEOUT": "5"}

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fault_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    marker = request.node.get_closest_marker("stack")
    options = marker.kwargs if marker else {}
    workers = options.pop("workers", 2)
    with running_stack(tmp_path, worker_count=workers, **{**FAULT_ENV, **options}) as stack:
        yield stack


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
            response = stack.http.get(f"{stack.api_url}/v1/tasks/{task_id}")
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


def test_sigkill_a_worker_with_calls_in_flight(fault_stack: Stack) -> None:
    stack = fault_stack
    bodies = slow_bodies(60, 3000)
    ids = submit_many(stack, bodies)
    name, held = worker_holding_calls(stack, bodies, ids, 50)
    worker = stack.children[name]
    killed_pid = worker.pid
    killed_at = time.time()
    worker.kill()
    tasks, lost, stuck = settle(stack, ids)
    assert (lost, stuck) == (0, 0)
    assert_all_succeeded(tasks)

    attempts = stored_attempts(stack, ids)
    on_killed = [
        a for task_attempts in attempts.values() for a in task_attempts if attempt_pid(a) == killed_pid
    ]
    assert on_killed, f"{name} (pid {killed_pid}) held no attempt when it was killed"
    found_lost = [
        a for task_attempts in attempts.values() for a in task_attempts if a["outcome"] == "worker_lost"
    ]
    assert found_lost, "the killed worker's attempts were found lost"
    alive_but_lost = [a for a in found_lost if attempt_pid(a) != killed_pid]
    assert not alive_but_lost, f"attempts of a live worker were found lost: {alive_but_lost}"
    assert all(
        a["outcome"] == "worker_lost" or parse_iso(a["finished_at"]).timestamp() <= killed_at
        for a in on_killed
    ), "every attempt still open on the killed worker is found lost"
    recovered = [
        task_id
        for task_id, task_attempts in attempts.items()
        if any(a["outcome"] == "worker_lost" for a in task_attempts)
    ]
    recovery = max(
        parse_iso(
            next(a for a in attempts[task_id] if a["outcome"] not in (None, "worker_lost"))["started_at"]
        ).timestamp()
        - killed_at
        for task_id in recovered
    )
    assert recovery <= LEASE + 2.0, f"recovered in {recovery:.1f}s, lease {LEASE}s"

    # The promise: every upstream call has an attempt; an attempt may lack its call (its worker died
    # between recording it and sending the request). A call is made again only for an attempt lost with
    # the killed worker: the calls it had in flight, cut off by the kill (the simulator records them with
    # no status, the caller having gone).
    calls = calls_by_task(stack, bodies, ids)
    for task_id in ids:
        unaccounted = calls_without_an_attempt(calls[task_id], attempts[task_id])
        assert not unaccounted, f"task {task_id}: calls without an attempt {unaccounted}, {attempts[task_id]}"
        lost_here = sum(a["outcome"] == "worker_lost" for a in attempts[task_id])
        assert len(calls[task_id]) - 1 <= lost_here, (task_id, calls[task_id], attempts[task_id])
    cut_off = [call for task_calls in calls.values() for call in task_calls if call["status"] is None]
    assert cut_off, "the killed worker had calls in flight"
    duplicates = sum(len(task_calls) - 1 for task_calls in calls.values())
    assert duplicates == len(cut_off), "only the calls cut off with the killed worker are made again"
    unsent = len(found_lost) - len(cut_off)
    record(
        FaultRow(
            "SIGKILL a worker, 60 tasks, >=50 calls in flight",
            len(ids),
            sum(t["status"] == "succeeded" for t in tasks.values()),
            lost,
            stuck,
            duplicates,
            f"{recovery:.1f}s (lease {LEASE:.0f}s)",
            note=f"the killed worker held {len(found_lost)} attempts: {len(cut_off)} calls in flight "
            f"({held} seen before the kill), each made once more; {unsent} not sent yet",
        )
    )


def test_sigterm_a_worker_finishes_its_calls(fault_stack: Stack) -> None:
    stack = fault_stack
    bodies = slow_bodies(40, 2000)
    ids = submit_many(stack, bodies)
    name, held = worker_holding_calls(stack, bodies, ids, 30)
    worker = stack.children[name]
    stopped_pid = worker.pid
    stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 60})
    stopper.start()
    tasks, lost, stuck = settle(stack, ids)
    stopper.join()
    assert (lost, stuck) == (0, 0)
    assert_all_succeeded(tasks)
    calls = calls_by_key(stack)
    duplicates = sum(calls[directive_key(body)] - 1 for body in bodies)
    assert duplicates == 0, "a warm shutdown finishes its calls; none is made twice"
    attempts = stored_attempts(stack, ids)
    assert all(len(task_attempts) == 1 for task_attempts in attempts.values())
    on_stopped = [
        a for task_attempts in attempts.values() for a in task_attempts if attempt_pid(a) == stopped_pid
    ]
    assert on_stopped, f"{name} (pid {stopped_pid}) held no attempt when it was stopped"
    assert all(a["outcome"] == "succeeded" for a in on_stopped), "the stopped worker finishes its calls"
    record(
        FaultRow(
            "SIGTERM a worker, 40 tasks in flight",
            len(ids),
            len(ids),
            lost,
            stuck,
            duplicates,
            "n/a",
            note=f"the stopped worker finished its {len(on_stopped)} calls ({held} seen in flight)",
        )
    )


def test_kill_redis_mid_load_and_restart_it(fault_stack: Stack) -> None:
    stack = fault_stack
    accepted: list[str] = []
    unavailable: list[float] = []
    stop = threading.Event()

    def submitter() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = stack.submit(with_directive(delay_ms="300"))
            except httpx.HTTPError:
                continue
            if response.status_code == 202:
                accepted.append(response.json()["id"])
            else:
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "store_unavailable"
                unavailable.append(time.monotonic() - started)
            time.sleep(0.05)

    thread = threading.Thread(target=submitter)
    thread.start()
    try:
        wait_until(lambda: len(accepted) >= 20, timeout=30, what="20 accepted tasks")
        stack.children["redis"].kill()
        down_at = time.monotonic()
        wait_until(
            lambda: len(unavailable) >= 3 and time.monotonic() - down_at >= 2,
            timeout=30,
            what="503s during 2 s of Redis being down",
        )
        stack.start_redis()
        up_at = time.monotonic()
        count = len(accepted)
        wait_until(lambda: len(accepted) >= count + 20, timeout=60, what="accepting again after the restart")
        back_after = time.monotonic() - up_at
    finally:
        stop.set()
        thread.join()
    tasks, lost, stuck = settle(stack, accepted, timeout=120)
    assert (lost, stuck) == (0, 0)
    assert_all_succeeded(tasks)
    assert max(unavailable) < stack.config.store_timeout * 2 + 1, "503 in bounded time, no hang"
    record(
        FaultRow(
            "kill -9 Redis mid-load, restart on its AOF",
            len(accepted),
            len(tasks),
            lost,
            stuck,
            None,
            f"API accepting {back_after:.1f}s after restart",
            note=f"down {up_at - down_at:.1f}s; {len(unavailable)} submits got 503, "
            f"each in <= {max(unavailable):.2f}s; worker restarts by the supervisor: "
            f"{sum(child.restarts for child in stack.children.values())}",
        )
    )


SCRIPTS = [
    # script, final status, error code, upstream calls
    ("ok", "succeeded", None, 1),
    ("500,503,ok", "succeeded", None, 3),
    ("503", "failed", "upstream_unavailable", 3),
    ("timeout,ok", "succeeded", None, 2),
    ("malformed,ok", "succeeded", None, 2),
    ("malformed", "failed", "bad_upstream_response", 3),
    ("safety", "failed", "content_blocked", 1),
    ("400", "failed", "upstream_rejected", 1),
]


def test_upstream_faults_end_in_their_documented_state(fault_stack: Stack) -> None:
    stack = fault_stack
    bodies = [with_directive(script=script, hang_s="30") for script, *_ in SCRIPTS for _ in range(6)]
    expected = [row for row in SCRIPTS for _ in range(6)]
    ids = submit_many(stack, bodies)
    tasks, lost, stuck = settle(stack, ids)
    assert (lost, stuck) == (0, 0)
    calls = calls_by_key(stack)
    for task_id, body, (script, status, code, count) in zip(ids, bodies, expected, strict=True):
        task = tasks[task_id]
        assert task["status"] == status, (script, task)
        assert (task["error"] or {}).get("code") == code, (script, task["error"])
        assert calls[directive_key(body)] == count, script
    record(
        FaultRow(
            "upstream 5xx/timeouts/malformed/safety/400, 48 tasks", len(ids), len(ids), lost, stuck, 0, "n/a"
        )
    )


@pytest.mark.stack(UPSTREAM_HOLD_SECONDS="60")
def test_a_429_makes_every_worker_wait(fault_stack: Stack) -> None:
    stack = fault_stack
    refused = with_directive(script="429,ok", retry_delay="2s")
    ids = submit_many(stack, [refused])
    wait_until(lambda: calls_by_key(stack).get(directive_key(refused)) == 1, timeout=10, what="the 429")
    ids += submit_many(stack, slow_bodies(20, 100))
    tasks, lost, stuck = settle(stack, ids)
    assert (lost, stuck) == (0, 0)
    assert_all_succeeded(tasks)
    calls = stack.http.get(f"{stack.simulator_url}/_sim/calls").json()
    refusal = next(call for call in calls if call["outcome"] == "429")
    later = [call["started"] for call in calls if call["started"] > refusal["finished"]]
    waited = min(later) - refusal["finished"]
    assert waited >= 2.0 - 0.05, f"the next call started {waited:.2f}s after the 429 asked for 2s"
    record(
        FaultRow(
            "429 with retryDelay 2s, 21 tasks on 2 workers",
            len(ids),
            len(ids),
            lost,
            stuck,
            0,
            f"shared cooldown {waited:.2f}s",
        )
    )


@pytest.mark.stack(MAX_ATTEMPTS="10", RETRY_BASE_DELAY="0.5", RETRY_MAX_DELAY="2")
def test_s3_unavailable_for_a_while(fault_stack: Stack) -> None:
    stack = fault_stack
    s3 = stack.children["s3"]
    s3.kill()
    bodies = slow_bodies(10, 100)
    ids = submit_many(stack, bodies)

    def storage_failures() -> int:
        return sum(
            1
            for task_id in ids
            for attempt in stack.task(task_id)["attempts"]
            if attempt["error_code"] == "storage_unavailable"
        )

    wait_until(lambda: storage_failures() >= 10, timeout=60, what="uploads failing")
    port = int(stack.env["S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    stack.children["s3"] = start_s3(port, log_dir=stack.log_dir)
    back = time.time()
    Storage(stack.config).ensure_bucket()  # the embedded S3 server keeps nothing across restarts
    tasks, lost, stuck = settle(stack, ids)
    assert (lost, stuck) == (0, 0)
    assert_all_succeeded(tasks)
    calls = calls_by_key(stack)
    duplicates = sum(calls[directive_key(body)] - 1 for body in bodies)
    assert duplicates == 0, "the saved upstream answer is uploaded; the upstream is not called again"
    finished = max(parse_iso(task["finished_at"]).timestamp() for task in tasks.values())
    record(
        FaultRow(
            "S3 down, 10 tasks, then back",
            len(ids),
            len(ids),
            lost,
            stuck,
            duplicates,
            f"all done {finished - back:.1f}s after S3 is back",
        )
    )


@pytest.mark.stack(workers=3, WORKER_CONCURRENCY="20", UPSTREAM_MAX_CONCURRENCY="5")
def test_the_global_cap_holds_across_processes(fault_stack: Stack) -> None:
    stack = fault_stack
    ids = submit_many(stack, slow_bodies(45, 300))
    tasks, lost, stuck = settle(stack, ids)
    assert (lost, stuck) == (0, 0)
    assert_all_succeeded(tasks)
    peak = stack.sim_stats()["max_in_flight"]
    assert peak <= 5, f"{peak} calls in flight with a cap of 5"
    assert peak >= 4, "the cap is reached, not undershot"
    record(
        FaultRow(
            "cap 5, 3 workers x 20 threads, 45 tasks",
            len(ids),
            len(ids),
            lost,
            stuck,
            0,
            f"peak in flight {peak}",
        )
    )


def test_nothing_is_left_in_the_store_of_a_finished_run(fault_stack: Stack) -> None:
    """After a killed worker and its recovery, the bookkeeping sets hold nothing of finished tasks."""
    stack = fault_stack
    bodies = slow_bodies(10, 1000)
    ids = submit_many(stack, bodies)
    victim, _ = worker_holding_calls(stack, bodies, ids, 5)
    killed_pid = stack.children[victim].pid
    stack.children[victim].kill()
    _, lost, stuck = settle(stack, ids)
    assert (lost, stuck) == (0, 0)
    attempts = [a for task_attempts in stored_attempts(stack, ids).values() for a in task_attempts]
    assert any(attempt_pid(a) == killed_pid for a in attempts), f"{victim} held no attempt when it was killed"
    assert all(attempt_pid(a) == killed_pid for a in attempts if a["outcome"] == "worker_lost")
    client = stack.api.app.extensions["runtime"].redis
    for name in ("active", "queued", "delayed", "running"):
        key = f"iq:{name}"
        members = client.smembers(key) if name == "active" else client.zrange(key, 0, -1)
        assert not members, f"{key} still holds {members}"
    assert not client.keys("iq:lease:*") and not client.keys("iq:result:*")


@pytest.mark.stack(UPSTREAM_RATE_PER_MINUTE="120")
def test_the_token_bucket_spaces_calls_across_workers(fault_stack: Stack) -> None:
    """120 calls a minute with a burst of two: 8 calls cannot start within less than 3 s."""
    stack = fault_stack
    ids = submit_many(stack, slow_bodies(8, 50))
    tasks, lost, stuck = settle(stack, ids)
    assert (lost, stuck) == (0, 0)
    assert_all_succeeded(tasks)
    starts = sorted(call["started"] for call in stack.http.get(f"{stack.simulator_url}/_sim/calls").json())
    span = starts[-1] - starts[0]
    assert span >= (8 - 2) * 0.5 - 0.1, f"8 calls started within {span:.2f}s"
    gaps = [later - earlier for earlier, later in zip(starts[1:], starts[2:], strict=False)]
    assert min(gaps) >= 0.4, f"calls after the burst came {min(gaps):.2f}s apart"
    record(
        FaultRow(
            "token bucket 120/min, 8 tasks on 2 workers",
            len(ids),
            len(ids),
            lost,
            stuck,
            0,
            f"8 calls over {span:.1f}s",
        )
    )
