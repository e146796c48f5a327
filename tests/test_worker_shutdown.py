"""A worker told to stop ends within WORKER_SHUTDOWN_TIMEOUT, even with Redis and the upstream stuck."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from devstack.processes import wait_until
from tests.report import FaultRow, record
from tests.stack import directive_key, running_stack, with_directive

SHUTDOWN = 2.0


def test_a_stopping_worker_exits_in_bounded_time_with_redis_down_and_calls_hanging(tmp_path: Path) -> None:
    env = {"WORKER_SHUTDOWN_TIMEOUT": str(SHUTDOWN), "UPSTREAM_TIMEOUT": "30", "TASK_LEASE_SECONDS": "3"}
    with running_stack(tmp_path, worker_count=1, **env) as stack:
        # the first call of each key hangs far longer than the deadline
        bodies = [with_directive(script="timeout,ok", hang_s="25") for _ in range(8)]
        ids = [stack.submit(body).json()["id"] for body in bodies]
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
        assert all(
            [a["outcome"] for a in task["attempts"]] == ["worker_lost", "succeeded"] for task in tasks
        ), [task["attempts"] for task in tasks]
        calls = stack.sim_stats()["by_key"]
        extra = sum(calls[directive_key(body)] - 1 for body in bodies)
        record(
            FaultRow(
                "SIGTERM a worker and the webhook worker, Redis down, 8 calls hanging",
                len(ids),
                len(tasks),
                0,
                0,
                extra,
                f"exited in {max(took.values()):.1f}s (WORKER_SHUTDOWN_TIMEOUT {SHUTDOWN:.0f}s)",
                note="each hanging call was cut off with its worker and made once more after the lease",
            )
        )
