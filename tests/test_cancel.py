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
    logs = [line for line in stack.worker_logs().splitlines() if running in line]
    assert any("cut off" in line for line in logs)
    refusals = [line for line in logs if "WARNING" in line and "refused" in line]
    assert refusals == [], "a call cut off is a cancel's expected end, not a refused write to warn of"
    assert stack.sim_stats()["max_in_flight"] == 1
    assert_bookkeeping_empty(stack)
    print(
        f"the upstream saw the call end {cut_off * 1000:.0f} ms after the cancel; next {started - sent:.2f}s"
    )


@pytest.mark.stack(workers=1, UPSTREAM_MAX_CONCURRENCY="1")
def test_cancel_after_cancels_a_waiting_task_before_it_calls_and_cuts_a_running_one_off(
    fault_stack: Stack,
) -> None:
    stack = fault_stack
    running_body, waiting_body = with_directive(delay_ms="30000"), with_directive(delay_ms="100")
    submitted = time.time()
    running = stack.submit(running_body, headers={"Cancel-After": "2s"}).json()["id"]
    wait_until(lambda: call_of(stack, directive_key(running_body)), timeout=20, what="the call to start")
    waiting = stack.submit(waiting_body, headers={"Cancel-After": "500ms"}).json()["id"]
    assert stack.task(waiting)["deadline_at"] is not None

    late = stack.wait_final(waiting, timeout=20)
    assert (late["status"], late["error"]["code"]) == ("canceled", "deadline_exceeded")
    assert late["attempts"] == [] and call_of(stack, directive_key(waiting_body)) is None, "never called"

    cut = stack.wait_final(running, timeout=20)
    assert (cut["status"], cut["error"]["code"]) == ("canceled", "deadline_exceeded")
    call = wait_until(
        lambda: (c := call_of(stack, directive_key(running_body))) and c["finished"] and c,
        timeout=10,
        what="the upstream to see its client go",
    )
    assert call["status"] is None, "its answer never came: nothing paid"  # type: ignore[index]
    ended = call["finished"] - submitted  # type: ignore[index]
    assert 2.0 <= ended < 2.0 + 1.5, f"cut off {ended:.2f}s after the submit (Cancel-After: 2s)"
    assert_bookkeeping_empty(stack)


@pytest.mark.parametrize("value", ["0s", "soon", "8d", "-1s", "1.5.5s", "10000h", ""])
def test_a_bad_cancel_after_is_400(stack: Stack, value: str) -> None:
    response = stack.submit(with_directive(), headers={"Cancel-After": value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "Cancel-After"
