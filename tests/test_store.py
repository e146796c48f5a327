"""The job store on a real Redis: creation, and the transitions it allows and refuses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from services.errors import InvalidTransition, JobError, NotFound
from services.store import JobStore, TaskStatus
from tests.stack import Stack


@pytest.fixture
def store(stack: Stack) -> Iterator[JobStore]:
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    yield JobStore(client, prefix="store-test")
    client.close()


def new_task(store: JobStore) -> str:
    return store.create(model="m", payload=b"{}", metadata=None)["id"]


def test_a_task_runs_and_succeeds_once(store: JobStore) -> None:
    task_id = new_task(store)
    assert task_id in store.active_ids()
    running = store.begin_attempt(task_id, max_attempts=3, worker="w")
    assert running is not None and running["status"] == TaskStatus.RUNNING
    done = store.succeed(task_id, outputs=[], text=[], usage=None, upstream_status=200)
    assert done["status"] == TaskStatus.SUCCEEDED and task_id not in store.active_ids()
    # A redelivered message for a finished task does nothing.
    assert store.begin_attempt(task_id, max_attempts=3, worker="w") is None
    assert store.get(task_id) == done
    # And a finished task never goes back.
    with pytest.raises(InvalidTransition):
        store.schedule_retry(task_id, JobError("x", retryable=True), delay=1)
    with pytest.raises(InvalidTransition):
        store.fail(task_id, JobError("x"))


def test_a_queued_task_cannot_succeed_without_running(store: JobStore) -> None:
    with pytest.raises(InvalidTransition):
        store.succeed(new_task(store), outputs=[], text=[], usage=None, upstream_status=200)


def test_redelivery_of_a_running_task_closes_the_lost_attempt(store: JobStore) -> None:
    task_id = new_task(store)
    store.begin_attempt(task_id, max_attempts=3, worker="dead")
    again = store.begin_attempt(task_id, max_attempts=3, worker="alive")
    assert again is not None
    assert [(a["outcome"], a["error_code"]) for a in again["attempts"]] == [
        ("worker_lost", "worker_lost"),
        (None, None),
    ]


def test_a_task_out_of_attempts_fails_instead_of_running(store: JobStore) -> None:
    task_id = new_task(store)
    store.begin_attempt(task_id, max_attempts=1, worker="w")
    assert store.begin_attempt(task_id, max_attempts=1, worker="w") is None
    task = store.get(task_id)
    assert task["status"] == TaskStatus.FAILED and task["error"]["code"] == "worker_lost"


def test_retry_puts_the_task_back_in_the_queue(store: JobStore) -> None:
    task_id = new_task(store)
    store.begin_attempt(task_id, max_attempts=3, worker="w")
    task = store.schedule_retry(
        task_id, JobError("busy", code="upstream_unavailable", retryable=True), delay=2
    )
    assert (
        task["status"] == TaskStatus.QUEUED and task["next_attempt_at"] > task["attempts"][0]["finished_at"]
    )
    assert task_id in store.active_ids()


def test_unknown_task(store: JobStore) -> None:
    with pytest.raises(NotFound):
        store.get("nope")
    with pytest.raises(NotFound):
        store.begin_attempt("nope", max_attempts=1, worker="w")
