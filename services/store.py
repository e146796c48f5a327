"""The job store: task records and request payloads in Redis, and every state change of a task.

A task record is one JSON document under ``{prefix}:task:{id}``; its request payload (the upstream's
body, possibly megabytes of base64) lives beside it under ``{prefix}:payload:{id}`` so that reading a
task never drags the payload along, and the Celery message carries only the id. Ids of tasks that are
not final sit in the set ``{prefix}:active`` (what a reaper scans).

Every change goes through ``_change``: read the document, let a pure function compute the next one
(``TaskStatus`` checks the transition), and write it with a compare-and-set script, retrying if another
process changed the task in between. No other code writes a task.

    queued ──► running ──► succeeded
      ▲  │        │  └───► failed
      │  │        └──────► queued (a retry is scheduled)
      │  └───────────────► failed | canceled
      └── running ───────► running (redelivered: the lost attempt is closed)
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis

from services.errors import InvalidTransition, JobError, NotFound, StoreUnavailable

Task = dict[str, Any]


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED})

ALLOWED_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELED}),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.RUNNING, TaskStatus.QUEUED, TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED}
    ),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELED: frozenset(),
}

# KEYS: task key, active set. ARGV: expected document, new document, task id, "1" if the new state is final.
_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[4] == '1' then redis.call('SREM', KEYS[2], ARGV[3]) end
return 1
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def new_task_id() -> str:
    """An unguessable id: a random UUID4 (122 random bits)."""
    return str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))


def _dump(task: Task) -> str:
    return json.dumps(task, separators=(",", ":"), sort_keys=True)


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "iq") -> None:
        self._redis = client
        self._prefix = prefix
        self._cas = client.register_script(_COMPARE_AND_SET)

    # keys -------------------------------------------------------------------------------------------
    def _task_key(self, task_id: str) -> str:
        return f"{self._prefix}:task:{task_id}"

    def _payload_key(self, task_id: str) -> str:
        return f"{self._prefix}:payload:{task_id}"

    @property
    def _active_key(self) -> str:
        return f"{self._prefix}:active"

    # reads ------------------------------------------------------------------------------------------
    def get(self, task_id: str) -> Task:
        with _mapped_errors():
            raw = self._redis.get(self._task_key(task_id))
        if raw is None:
            raise NotFound(f"no task with id {task_id!r}", field="id")
        return json.loads(raw)

    def load_payload(self, task_id: str) -> bytes:
        with _mapped_errors():
            raw = self._redis.get(self._payload_key(task_id))
        if raw is None:
            raise NotFound(f"the payload of task {task_id!r} is missing", field="id")
        return raw

    def active_ids(self) -> set[str]:
        with _mapped_errors():
            return {member.decode() for member in self._redis.smembers(self._active_key)}

    def ping(self) -> None:
        with _mapped_errors():
            self._redis.ping()

    # creation ---------------------------------------------------------------------------------------
    def create(self, *, model: str, payload: bytes, metadata: dict[str, Any] | None) -> Task:
        """Store a new queued task and its payload atomically; return the record."""
        task_id = new_task_id()
        task: Task = {
            "id": task_id,
            "status": TaskStatus.QUEUED.value,
            "model": model,
            "created_at": now_iso(),
            "started_at": None,
            "finished_at": None,
            "attempts": [],
            "outputs": [],
            "text": [],
            "usage": None,
            "metadata": metadata,
            "error": None,
            "next_attempt_at": None,
        }
        with _mapped_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(self._payload_key(task_id), payload)
            pipe.set(self._task_key(task_id), _dump(task))
            pipe.sadd(self._active_key, task_id)
            pipe.execute()
        return task

    def discard(self, task_id: str) -> None:
        """Remove a task that was never enqueued (its enqueue failed), so that nothing is left behind."""
        with _mapped_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._task_key(task_id), self._payload_key(task_id))
            pipe.srem(self._active_key, task_id)
            pipe.execute()

    # transitions ------------------------------------------------------------------------------------
    def begin_attempt(self, task_id: str, *, max_attempts: int, worker: str) -> Task | None:
        """Move a task to running with a new attempt; None when there is nothing to run.

        A final task (a redelivered message) is left alone. A task found ``running`` lost its worker:
        that attempt is closed as ``worker_lost``. A task that has used all its attempts fails.
        """

        def change(task: Task) -> Task | None:
            status = TaskStatus(task["status"])
            if status.is_final:
                return None
            now = now_iso()
            _close_open_attempt(task, now, outcome="worker_lost", error_code="worker_lost")
            if len(task["attempts"]) >= max_attempts:
                last = task["attempts"][-1] if task["attempts"] else {}
                error = task["error"] or {
                    "code": last.get("error_code") or "attempts_exhausted",
                    "message": f"gave up after {len(task['attempts'])} attempts",
                    "retryable": False,
                    "upstream_status": last.get("upstream_status"),
                }
                return _finish(task, TaskStatus.FAILED, now, error=error)
            _check(status, TaskStatus.RUNNING)
            task["status"] = TaskStatus.RUNNING.value
            task["started_at"] = task["started_at"] or now
            task["next_attempt_at"] = None
            task["attempts"].append(
                {
                    "number": len(task["attempts"]) + 1,
                    "started_at": now,
                    "finished_at": None,
                    "outcome": None,
                    "upstream_status": None,
                    "error_code": None,
                    "duration_ms": None,
                    "worker": worker,
                }
            )
            return task

        task = self._change(task_id, change)
        return task if task is not None and task["status"] == TaskStatus.RUNNING else None

    def succeed(
        self,
        task_id: str,
        *,
        outputs: list[dict[str, Any]],
        text: list[str],
        usage: dict[str, Any] | None,
        upstream_status: int,
    ) -> Task:
        def change(task: Task) -> Task:
            _check(TaskStatus(task["status"]), TaskStatus.SUCCEEDED)
            now = now_iso()
            _close_open_attempt(task, now, outcome="succeeded", upstream_status=upstream_status)
            task.update(outputs=outputs, text=text, usage=usage, error=None)
            return _finish(task, TaskStatus.SUCCEEDED, now)

        return self._change_required(task_id, change)

    def schedule_retry(self, task_id: str, error: JobError, *, delay: float) -> Task:
        """Close the running attempt as failed-but-retryable and put the task back in the queue."""

        def change(task: Task) -> Task:
            _check(TaskStatus(task["status"]), TaskStatus.QUEUED)
            now = now_iso()
            _close_open_attempt(
                task, now, outcome="retry", error_code=error.code, upstream_status=error.upstream_status
            )
            task["status"] = TaskStatus.QUEUED.value
            task["next_attempt_at"] = _iso_after(now, delay)
            return task

        return self._change_required(task_id, change)

    def fail(self, task_id: str, error: JobError) -> Task:
        def change(task: Task) -> Task:
            _check(TaskStatus(task["status"]), TaskStatus.FAILED)
            now = now_iso()
            _close_open_attempt(
                task, now, outcome="failed", error_code=error.code, upstream_status=error.upstream_status
            )
            return _finish(task, TaskStatus.FAILED, now, error=error.to_record())

        return self._change_required(task_id, change)

    # the one writer ---------------------------------------------------------------------------------
    def _change_required(self, task_id: str, change: Callable[[Task], Task]) -> Task:
        task = self._change(task_id, change)
        assert task is not None
        return task

    def _change(self, task_id: str, change: Callable[[Task], Task | None]) -> Task | None:
        key = self._task_key(task_id)
        with _mapped_errors():
            while True:
                raw = self._redis.get(key)
                if raw is None:
                    raise NotFound(f"no task with id {task_id!r}", field="id")
                new = change(json.loads(raw))
                if new is None:
                    return None
                final = "1" if TaskStatus(new["status"]).is_final else "0"
                if self._cas(keys=[key, self._active_key], args=[raw, _dump(new), task_id, final]):
                    return new


def _check(current: TaskStatus, target: TaskStatus) -> None:
    if target not in ALLOWED_TRANSITIONS[current]:
        raise InvalidTransition(f"a {current.value} task cannot become {target.value}")


def _finish(task: Task, status: TaskStatus, now: str, *, error: dict[str, Any] | None = None) -> Task:
    task["status"] = status.value
    task["finished_at"] = now
    task["next_attempt_at"] = None
    if error is not None:
        task["error"] = error
    return task


def _close_open_attempt(
    task: Task,
    now: str,
    *,
    outcome: str,
    error_code: str | None = None,
    upstream_status: int | None = None,
) -> None:
    if not task["attempts"] or task["attempts"][-1]["finished_at"] is not None:
        return
    attempt = task["attempts"][-1]
    attempt.update(
        finished_at=now,
        outcome=outcome,
        error_code=error_code,
        upstream_status=upstream_status,
        duration_ms=round((parse_iso(now) - parse_iso(attempt["started_at"])).total_seconds() * 1000),
    )


def _iso_after(now: str, seconds: float) -> str:
    moment = parse_iso(now).timestamp() + seconds
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"the task store (Redis) is unavailable: {exc}") from exc
    except redis.ResponseError as exc:
        if "MISCONF" in str(exc) or "OOM" in str(exc) or "LOADING" in str(exc) or "READONLY" in str(exc):
            raise StoreUnavailable(f"the task store (Redis) refused the write: {exc}") from exc
        raise
