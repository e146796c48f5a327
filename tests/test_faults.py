"""The fault suite: kill workers, Redis and S3; no accepted task is lost or stuck, none is paid twice
but for the calls a killed worker had in flight.

Each test runs its own real stack (redis-server, S3 server, simulator, ≥2 Celery worker processes, the
API) on free ports (``fault_stack``, tests/conftest.py), waits until every worker consumes, submits work,
breaks something, and at the end checks every accepted (202) task: final, with the right outcome, and
the upstream calls the simulator itself logged. Each test adds a row to the fault report printed at the
end of the run. The upstream's faults are in test_faults_upstream.py; stale workers and lost messages in
test_faults_takeover.py.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import httpx
import pytest

from devstack.processes import start_s3, wait_until
from services.clock import parse_iso
from services.storage import Storage
from tests.fault_kit import (
    LEASE,
    assert_all_succeeded,
    attempt_pid,
    both_brokers,
    calls_by_key,
    calls_by_task,
    calls_without_an_attempt,
    on_broker,
    paid_twice,
    settle,
    settle_succeeded,
    slow_bodies,
    stored_attempts,
    submit_many,
    worker_holding_calls,
)
from tests.report import FaultRow, record
from tests.stack import Stack, directive_key, with_directive

pytestmark = pytest.mark.timeout(240)


@both_brokers
def test_sigkill_a_worker_with_calls_in_flight(fault_stack: Stack) -> None:
    stack = fault_stack
    bodies = slow_bodies(60, 3000)
    ids = submit_many(stack, bodies)
    name, held = worker_holding_calls(stack, bodies, ids, 50)
    worker = stack.children[name]
    killed_pid = worker.pid
    killed_at = time.time()
    worker.kill()
    tasks = settle_succeeded(stack, ids)

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
            on_broker(stack, "SIGKILL a worker, 60 tasks, >=50 calls in flight"),
            len(ids),
            sum(t["status"] == "succeeded" for t in tasks.values()),
            0,
            0,
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


@pytest.mark.stack(TASK_LEASE_SECONDS="10")
def test_kill_redis_mid_load_and_restart_it(fault_stack: Stack) -> None:
    """Redis is down for less than a lease: a worker that holds a paid answer records it once Redis is
    back (its lease still keeps the task), so nothing is paid twice."""
    stack = fault_stack
    accepted: list[str] = []
    bodies: dict[str, dict] = {}
    unavailable: list[float] = []
    problems: list[str] = []  # anything but a 202 or a prompt 503 store_unavailable fails the test
    stop = threading.Event()

    def submitter() -> None:
        while not stop.is_set():
            body = with_directive(delay_ms="300")
            started = time.monotonic()
            try:
                response = stack.submit(body)
            except httpx.HTTPError as exc:  # the API hung (client timeout) or went away
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code == 202:
                accepted.append(response.json()["id"])
                bodies[accepted[-1]] = body
            elif response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable":
                unavailable.append(time.monotonic() - started)
            else:
                problems.append(f"{response.status_code}: {response.text[:200]}")
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
    assert not problems, problems
    tasks = settle_succeeded(stack, accepted, timeout=120)
    assert max(unavailable) < stack.config.store_timeout * 2 + 1, "503 in bounded time, no hang"
    duplicates = paid_twice(stack, list(bodies.values()))
    assert duplicates == 0, "an answer paid for while Redis was down is recorded once it is back"
    record(
        FaultRow(
            "kill -9 Redis mid-load, restart on its AOF",
            len(accepted),
            len(tasks),
            0,
            0,
            duplicates,
            f"API accepting {back_after:.1f}s after restart",
            note=f"down {up_at - down_at:.1f}s; {len(unavailable)} submits got 503, "
            f"each in <= {max(unavailable):.2f}s; worker restarts by the supervisor: "
            f"{sum(child.restarts for child in stack.children.values())}",
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
    tasks = settle_succeeded(stack, ids)
    calls = calls_by_key(stack)
    duplicates = sum(calls[directive_key(body)] - 1 for body in bodies)
    assert duplicates == 0, "the saved upstream answer is uploaded; the upstream is not called again"
    finished = max(parse_iso(task["finished_at"]).timestamp() for task in tasks.values())
    record(
        FaultRow(
            "S3 down, 10 tasks, then back",
            len(ids),
            len(ids),
            0,
            0,
            duplicates,
            f"all done {finished - back:.1f}s after S3 is back",
        )
    )


@both_brokers
@pytest.mark.stack(UPSTREAM_MAX_CONCURRENCY="6")
def test_a_worker_killed_under_the_cap_leaves_nothing_admitted(fault_stack: Stack) -> None:
    """With a cap, admission is in the path: most tasks wait in their tenant's ready set, and the killed
    worker's tasks hold places in the window until their leases expire. All end; the cap holds; and the
    bookkeeping (store and admission) holds nothing of the finished tasks, so no place is lost for ever."""
    stack = fault_stack
    bodies = slow_bodies(30, 1000)
    ids = submit_many(stack, bodies)
    victim, held = worker_holding_calls(stack, bodies, ids, 4)
    killed_pid = stack.children[victim].pid
    killed_at = time.time()
    stack.children[victim].kill()
    tasks = settle_succeeded(stack, ids)  # also asserts that the bookkeeping is empty
    attempts = [a for task_attempts in stored_attempts(stack, ids).values() for a in task_attempts]
    assert any(attempt_pid(a) == killed_pid for a in attempts), f"{victim} held no attempt when it was killed"
    assert all(attempt_pid(a) == killed_pid for a in attempts if a["outcome"] == "worker_lost")
    client = stack.runtime.redis
    assert not client.keys("iq:lease:*") and not client.keys("iq:result:*")
    peak = stack.sim_stats()["max_in_flight"]
    assert peak <= 6, f"{peak} calls in flight under a cap of 6"
    finished = max(parse_iso(task["finished_at"]).timestamp() for task in tasks.values())
    record(
        FaultRow(
            on_broker(stack, "SIGKILL a worker under a cap of 6 (admission active), 30 tasks of 2 tenants"),
            len(ids),
            len(tasks),
            0,
            0,
            paid_twice(stack, bodies),
            f"all done {finished - killed_at:.1f}s after the kill (lease {LEASE:.0f}s)",
            note=f"it held {held} calls; peak in flight {peak}; nothing left admitted, waiting or unfinished",
        )
    )


SHUTDOWN = 2.0


@pytest.mark.stack(workers=1, WORKER_SHUTDOWN_TIMEOUT=str(SHUTDOWN), UPSTREAM_TIMEOUT="30")
def test_a_stopping_worker_exits_in_bounded_time_with_redis_down_and_calls_hanging(
    fault_stack: Stack,
) -> None:
    """SIGTERM while Redis is down and every call hangs: Celery's warm shutdown would wait for them; the
    worker and the webhook worker exit within WORKER_SHUTDOWN_TIMEOUT, and the tasks run again later."""
    stack = fault_stack
    # the first call of each key hangs far longer than the deadline
    bodies = [with_directive(script="timeout,ok", hang_s="25") for _ in range(8)]
    ids = submit_many(stack, bodies)
    wait_until(lambda: stack.sim_stats()["in_flight"] >= 8, timeout=30, what="8 calls in flight")
    stack.children["redis"].kill()
    stopping = {}
    for name in ("worker0", "webhook-worker"):
        child = stack.children[name]
        child.stopped = True  # the supervisor leaves it down
        child.signal(signal.SIGTERM)
        stopping[name] = time.monotonic()
    took = {}
    for name, since in stopping.items():
        process = stack.children[name].process
        assert process is not None
        try:
            process.wait(timeout=SHUTDOWN + 20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still runs {SHUTDOWN + 20:.0f}s after SIGTERM") from None
        took[name] = time.monotonic() - since
    # Redis back, a new worker: what the stopped one held runs again once its leases expire.
    stack.start_redis()
    stack.start_worker("worker1")
    stack.wait_ready(["worker1"])
    tasks = [stack.wait_final(task_id, timeout=60) for task_id in ids]
    assert all(task["status"] == "succeeded" for task in tasks), tasks
    assert all([a["outcome"] for a in task["attempts"]] == ["worker_lost", "succeeded"] for task in tasks), [
        task["attempts"] for task in tasks
    ]
    extra = paid_twice(stack, bodies)
    assert extra == 0, "the cut-off calls had not answered: nothing was paid for twice"
    record(
        FaultRow(
            "SIGTERM a worker and the webhook worker, Redis down, 8 calls hanging",
            len(ids),
            len(tasks),
            0,
            0,
            extra,
            f"exited in {max(took.values()):.1f}s (WORKER_SHUTDOWN_TIMEOUT {SHUTDOWN:.0f}s)",
            note=f"worker {took['worker0']:.1f}s, webhook worker {took['webhook-worker']:.1f}s; each hanging "
            "call was cut off with its worker and made once more after the lease",
        )
    )
