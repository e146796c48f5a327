"""services.work_gate.WorkGate: at most N threads work at once; a thread waiting (on the upstream, for
a slot) holds no permit, and takes one again before it goes on."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from devstack.processes import wait_until
from services.work_gate import WorkGate


def test_no_more_threads_work_at_once_than_there_are_permits() -> None:
    gate = WorkGate(3)
    release = threading.Event()
    lock = threading.Lock()
    working, most = 0, 0

    def job() -> None:
        nonlocal working, most
        with gate.working():
            with lock:
                working += 1
                most = max(most, working)
            release.wait(10)
            with lock:
                working -= 1

    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(job) for _ in range(10)]
        wait_until(lambda: working == 3, timeout=10, what="three at work")
        assert most == 3
        release.set()
        for future in futures:
            future.result(timeout=10)
    assert most == 3


def test_a_waiting_thread_gives_its_permit_to_another_and_takes_one_back_after() -> None:
    gate = WorkGate(1)
    call_returns = threading.Event()
    other_worked = threading.Event()
    order: list[str] = []

    def caller() -> None:
        with gate.working():
            order.append("caller starts")
            with gate.waiting():  # the upstream call: no permit held
                call_returns.wait(10)
            order.append("caller records")

    def other() -> None:
        with gate.working():
            order.append("other works")
            other_worked.set()

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(caller)
        wait_until(lambda: order == ["caller starts"], timeout=10, what="the call to begin")
        second = pool.submit(other)
        assert other_worked.wait(10), "the only permit was free while the caller waited"
        call_returns.set()
        first.result(timeout=10)
        second.result(timeout=10)
    assert order == ["caller starts", "other works", "caller records"]
