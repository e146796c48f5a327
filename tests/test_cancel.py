"""A cancel that stops paying: the running task's upstream call is cut off within a second, as the
upstream itself sees it (the simulator's call log), and its slot goes to the next task at once."""

from __future__ import annotations

import time

import pytest

from devstack.processes import wait_until
from tests.fault_kit import assert_bookkeeping_empty
from tests.stack import Stack, directive_key, with_directive


def call_of(stack: Stack, key: str) -> dict | None:
    return next((call for call in stack.sim_call_log() if call["key"] == key), None)


@pytest.mark.stack(workers=1, UPSTREAM_MAX_CONCURRENCY="1")
def test_cancel_cuts_the_upstream_call_off_and_frees_its_slot(fault_stack: Stack) -> None:
    stack = fault_stack
    running_body, waiting_body = with_directive(delay_ms="30000"), with_directive(delay_ms="200")
    running = stack.submit(running_body).json()["id"]
    wait_until(lambda: call_of(stack, directive_key(running_body)), timeout=20, what="the call to start")
    waiting = stack.submit(waiting_body).json()["id"]
    assert stack.task(waiting)["queue_position"] == 1, "behind the running one: the cap is 1"

    sent = time.time()
    response = stack.http.post(
        f"{stack.api_url}/v1/tasks/{running}/cancel", headers=stack.headers(stack.owners.get(running))
    )
    assert response.status_code == 200 and response.json()["status"] == "canceled"

    def ended() -> dict | None:
        call = call_of(stack, directive_key(running_body))
        return call if call and call["finished"] is not None else None

    call = wait_until(ended, timeout=10, what="the upstream to see its client go")
    assert call["status"] is None, "the upstream never sent its answer: nothing was paid for"  # type: ignore[index]
    cut_off = call["finished"] - sent  # type: ignore[index]
    assert cut_off < 1.0, f"the call ended {cut_off:.2f}s after the cancel"

    wait_until(lambda: call_of(stack, directive_key(waiting_body)), timeout=10, what="the next task's call")
    started = call_of(stack, directive_key(waiting_body))["started"]  # type: ignore[index]
    assert started - sent < 2.0, f"the next task started {started - sent:.2f}s after the cancel"
    assert stack.wait_final(waiting)["status"] == "succeeded"
    [attempt] = stack.task(running)["attempts"]
    assert attempt["outcome"] == "canceled"
    assert "cut off" in stack.worker_logs()
    assert stack.sim_stats()["max_in_flight"] == 1
    assert_bookkeeping_empty(stack)
    print(
        f"the upstream saw the call end {cut_off * 1000:.0f} ms after the cancel; next {started - sent:.2f}s"
    )
