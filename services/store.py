"""The job store: task records and request payloads in Redis, and every state change of a task.

A task record is one JSON document under ``{prefix}:task:{id}``; its request payload (the upstream's
body, possibly megabytes of base64) lives beside it under ``{prefix}:payload:{id}`` so that reading a
task never drags the payload along, and the Celery message carries only the id.

Every change goes through ``_write``: read the document (or take the one the caller last wrote: a
lease carries it), let a pure function compute the next one (``_check`` enforces
``ALLOWED_TRANSITIONS``), and write it with one compare-and-set script, retrying on a fresh read if
another process changed the task in between. No other code writes a task. The same script applies, in
the same atomic step, what follows from the change (``_consequences``), so that a crash can never split
a state change from its bookkeeping:

- ``{prefix}:active``    set of the ids of tasks that are not final (what the reaper scans);
- ``{prefix}:queued``    sorted set: id of a queued task whose message was sent → when (ms); one that
                          waits too long while the broker's queue is empty lost its message;
- ``{prefix}:delayed``   sorted set: id of a task waiting for a retry → when it is due (ms); the sweeper
                          enqueues it then (no Celery countdown, which a dying worker would take along);
- ``{prefix}:running``   sorted set: id of a running task → its lease's deadline (ms);
- ``{prefix}:result:{id}`` the upstream's answer, saved when its outputs could not be uploaded and kept
                          until the task is final, so that the retry after a storage failure never calls
                          (and pays) the upstream again (``JobRunner``; read with the task when an
                          attempt starts);
- ``{prefix}:lease:{id}`` the running attempt's lease, taken atomically with the move to running, so that
                          two deliveries of one task never call the upstream at the same time;
- ``{prefix}:wh:event:{event id}`` and ``{prefix}:wh:due``: the webhook outbox, one event per status the
                          task's webhook asked for, written with the change that caused it.

    queued ──► running ──► succeeded
      ▲  │        │  └───► failed
      │  │        └──────► queued (a retry is scheduled)
      │  └───────────────► failed | canceled
      └── running ───────► running (redelivered after its lease expired: the lost attempt is closed)
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis

from services.errors import InvalidTransition, JobError, LeaseLost, NotFound, StoreUnavailable

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
    TaskStatus.QUEUED: frozenset(
        {TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELED}
    ),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.RUNNING, TaskStatus.QUEUED, TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED}
    ),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELED: frozenset(),
}

WEBHOOK_EVENTS = ("running", "succeeded", "failed", "canceled")

# KEYS[1]: the task. ARGV[1]: the document expected there, ARGV[2]: the new one, ARGV[3]: JSON
# {"absent": [keys that must not exist], "equal": [[key, value], ...], "writes": [[command, args...]]}.
# Returns 1 when written, 0 when the task changed meanwhile, -1 when a key that must be absent exists,
# -2 when a key does not hold the value it must.
_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local extra = cjson.decode(ARGV[3])
for _, key in ipairs(extra.absent) do
  if redis.call('EXISTS', key) == 1 then return -1 end
end
for _, pair in ipairs(extra.equal) do
  if redis.call('GET', pair[1]) ~= pair[2] then return -2 end
end
redis.call('SET', KEYS[1], ARGV[2])
for _, command in ipairs(extra.writes) do redis.call(unpack(command)) end
return 1
"""

# KEYS[1]: the sorted set to claim from, KEYS[2]: the one to move claimed members to (may be the same).
# ARGV: claim members scored at most ARGV[1], give them score ARGV[2], at most ARGV[3] of them.
_CLAIM = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(members) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[2], ARGV[2], member)
end
return members
"""

# KEYS[1]: the running set. ARGV: now (ms), the score claimed members get (ms), limit, the lease key prefix.
# A member whose lease key is still there is not claimed: its score in the set ran ahead of the key's
# expiry (the deadline is computed just before the renewal sets the key's TTL), so it moves to when
# the key expires. Claimed, its next attempt would find the lease still held and drop the task for
# another whole lease.
_CLAIM_EXPIRED = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for _, member in ipairs(members) do
  local ttl = redis.call('PTTL', ARGV[4] .. member)
  if ttl > 0 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + ttl, member)
  else
    redis.call('ZADD', KEYS[1], ARGV[2], member)
    claimed[#claimed + 1] = member
  end
end
return claimed
"""

# KEYS[1]: a lease, KEYS[2]: the running set. ARGV: holder's token, time to live (ms), new deadline
# (epoch ms), task id. Returns 1 if the lease was still held (and is extended), else 0.
_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[4])
return 1
"""


def now_iso() -> str:
    return _iso(time.time())


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _epoch_ms(value: str) -> int:
    return round(parse_iso(value).timestamp() * 1000)


def new_task_id() -> str:
    """An unguessable id: a random UUID4 (122 random bits)."""
    return str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class Lease:
    """A running attempt's claim on its task; ``token`` proves who holds it.

    ``document`` is the task's record as the attempt wrote it: the attempt's closing change (succeed,
    fail, retry) compares against it directly instead of reading the record first, one round trip less;
    if the record changed meanwhile, the compare-and-set fails and the change is made on a fresh read.
    """

    task_id: str
    token: str
    seconds: float
    document: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Attempt:
    """A started attempt and what it needs, read in the same round trip as the task: the request
    payload (None if it is missing) and the upstream answer an earlier attempt saved (usually None)."""

    task: Task
    lease: Lease
    payload: bytes | None
    saved_result: bytes | None


@dataclass
class _Extra:
    absent: list[str] = field(default_factory=list)
    equal: list[list[str]] = field(default_factory=list)
    writes: list[list[str]] = field(default_factory=list)


class JobStore:
    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "iq",
        *,
        task_retention: int = 30 * 86400,
        payload_retention: int = 86400,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._task_retention = task_retention
        self._payload_retention = payload_retention
        self._cas = client.register_script(_COMPARE_AND_SET)
        self._renew = client.register_script(_RENEW_LEASE)
        self._claim = client.register_script(_CLAIM)
        self._claim_expired = client.register_script(_CLAIM_EXPIRED)

    # keys -------------------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    # reads ------------------------------------------------------------------------------------------
    def get(self, task_id: str) -> Task:
        with mapped_redis_errors():
            raw = self._redis.get(self.key("task", task_id))
        if raw is None:
            raise NotFound(f"no task with id {task_id!r}", field="id")
        return json.loads(raw)

    def load_payload(self, task_id: str) -> bytes:
        with mapped_redis_errors():
            raw = self._redis.get(self.key("payload", task_id))
        if raw is None:
            raise NotFound(f"the payload of task {task_id!r} is missing", field="id")
        return raw

    def active_ids(self) -> set[str]:
        with mapped_redis_errors():
            return {member.decode() for member in self._redis.smembers(self.key("active"))}

    def load_result(self, task_id: str) -> bytes | None:
        """The upstream's answer saved by an earlier attempt, if the task has one."""
        with mapped_redis_errors():
            return self._redis.get(self.key("result", task_id))

    def save_result(self, task_id: str, body: bytes) -> None:
        with mapped_redis_errors():
            self._redis.set(self.key("result", task_id), body, ex=self._payload_retention)

    # what the sweeper claims: each member is handed to one caller only -------------------------------
    def claim_due_retries(self, limit: int = 500) -> list[str]:
        """Tasks whose retry is due now; they move to ``queued`` and the caller must enqueue them."""
        now = _now_ms()
        return self._claim_members("delayed", "queued", now, now, limit)

    def claim_expired_leases(self, lease_seconds: float, limit: int = 500) -> list[str]:
        """Running tasks whose lease expired (their worker is gone); the caller must enqueue them.

        Their deadline moves one lease ahead, so other sweepers leave them alone meanwhile. One whose
        lease key has not expired yet is left for when it has (``_CLAIM_EXPIRED``).
        """
        now = _now_ms()
        args = [now, now + _ms(lease_seconds), limit, self.key("lease", "")]
        with mapped_redis_errors():
            members = self._claim_expired(keys=[self.key("running")], args=args)
        return [member.decode() for member in members]

    def claim_lost_messages(self, older_than: float, limit: int = 500) -> list[str]:
        """Queued tasks enqueued more than ``older_than`` s ago and not started; to enqueue again.

        Call only when the broker's queue is empty: then such a task's message was lost.
        """
        now = _now_ms()
        return self._claim_members("queued", "queued", now - _ms(older_than), now, limit)

    def _claim_members(self, source: str, target: str, max_score: int, score: int, limit: int) -> list[str]:
        with mapped_redis_errors():
            members = self._claim(keys=[self.key(source), self.key(target)], args=[max_score, score, limit])
        return [member.decode() for member in members]

    def ping(self) -> None:
        with mapped_redis_errors():
            self._redis.ping()

    # creation ---------------------------------------------------------------------------------------
    def create(
        self,
        *,
        model: str,
        payload: bytes,
        metadata: dict[str, Any] | None,
        webhook: dict[str, Any] | None = None,
        also_set: Callable[[Task], tuple[str, str, int]] | None = None,
        message: Callable[[str], tuple[str, bytes]] | None = None,
    ) -> Task:
        """Store a new queued task and its payload atomically; return the record.

        ``also_set(task)`` may name one more record (key, value, ttl) to write in the same transaction;
        ``message(task_id)`` a (list, message) to push onto a list in it: the job's broker message, so
        that a task is never stored without being enqueued, nor enqueued without being stored.
        """
        task_id = new_task_id()
        now = time.time()
        task: Task = {
            "id": task_id,
            "status": TaskStatus.QUEUED.value,
            "model": model,
            "created_at": _iso(now),
            "started_at": None,
            "finished_at": None,
            "attempts": [],
            "outputs": [],
            "text": [],
            "usage": None,
            "metadata": metadata,
            "error": None,
            "next_attempt_at": None,
            "webhook": webhook,
        }
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(self.key("payload", task_id), payload)
            pipe.set(self.key("task", task_id), _dump(task))
            pipe.sadd(self.key("active"), task_id)
            pipe.zadd(self.key("queued"), {task_id: round(now * 1000)})
            if also_set is not None:
                key, value, ttl = also_set(task)
                pipe.set(key, value, ex=ttl)
            if message is not None:
                pipe.lpush(*message(task_id))
            pipe.execute()
        return task

    # leases -----------------------------------------------------------------------------------------
    def renew_lease(self, lease: Lease) -> bool:
        """Extend a lease its holder still has; False when it was lost (expired and maybe taken)."""
        with mapped_redis_errors():
            deadline = _now_ms() + _ms(lease.seconds)
            keys = [self.key("lease", lease.task_id), self.key("running")]
            return bool(
                self._renew(keys=keys, args=[lease.token, _ms(lease.seconds), deadline, lease.task_id])
            )

    # transitions ------------------------------------------------------------------------------------
    def begin_attempt(
        self, task_id: str, *, max_attempts: int, worker: str, lease_seconds: float
    ) -> tuple[Task, Lease] | None:
        """``start_attempt`` without the payload: (task, lease), or None when there is nothing to run."""
        attempt = self.start_attempt(
            task_id, max_attempts=max_attempts, worker=worker, lease_seconds=lease_seconds
        )
        return None if attempt is None else (attempt.task, attempt.lease)

    def start_attempt(
        self, task_id: str, *, max_attempts: int, worker: str, lease_seconds: float
    ) -> Attempt | None:
        """Move a task to running with a new attempt and a lease; None when there is nothing to run.

        Two round trips: one reads the task, its payload and any saved upstream answer together, one
        writes the change (compare-and-set).

        A final task (a redelivered message) is left alone, and so is a task whose lease another worker
        holds. A task found ``running`` without a lease lost its worker: that attempt is closed as
        ``worker_lost``. A task that has used all its attempts fails instead.
        """
        lease = Lease(task_id, f"{worker}:{secrets.token_hex(8)}", lease_seconds)

        def change(task: Task, extra: _Extra) -> Task | None:
            status = TaskStatus(task["status"])
            if status.is_final:
                return None
            lease_key = self.key("lease", task_id)
            extra.absent.append(lease_key)  # another worker's live attempt: leave the task alone
            now = now_iso()
            _close_open_attempt(task, now, outcome="worker_lost", error_code="worker_lost")
            if attempts_used(task) >= max_attempts:
                last = task["attempts"][-1] if task["attempts"] else {}
                error = {
                    "code": last.get("error_code") or "attempts_exhausted",
                    "message": f"gave up after {len(task['attempts'])} attempts; the last ended with "
                    f"{last.get('error_code') or 'no error code'}",
                    "retryable": True,
                    "upstream_status": last.get("upstream_status"),
                }
                return _finish(task, TaskStatus.FAILED, now, error=error)
            _check(status, TaskStatus.RUNNING)
            deadline = _now_ms() + _ms(lease_seconds)
            extra.writes += [
                ["SET", lease_key, lease.token, "PX", str(_ms(lease_seconds))],
                ["ZADD", self.key("running"), str(deadline), task_id],
            ]
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

        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self.key("task", task_id))
            pipe.get(self.key("payload", task_id))
            pipe.get(self.key("result", task_id))
            raw, payload, saved = pipe.execute()
        if raw is None:
            raise NotFound(f"no task with id {task_id!r}", field="id")
        task, document = self._write(task_id, change, known=raw)
        if task is None or task["status"] != TaskStatus.RUNNING:
            return None
        lease = Lease(lease.task_id, lease.token, lease.seconds, document=document)
        return Attempt(task, lease, payload, saved)

    def succeed(
        self,
        task_id: str,
        *,
        outputs: list[dict[str, Any]],
        text: list[str],
        usage: dict[str, Any] | None,
        upstream_status: int | None,
        lease: Lease | None = None,
    ) -> Task:
        """Close the running attempt as succeeded.

        ``lease``: the attempt's, whose document saves reading the record first (one round trip when
        the record is as the attempt left it). The lease is not required to be still held: an answer
        already paid for is recorded as long as the task can still succeed.
        """

        def change(task: Task, extra: _Extra) -> Task:
            _check(TaskStatus(task["status"]), TaskStatus.SUCCEEDED)
            now = now_iso()
            _close_open_attempt(task, now, outcome="succeeded", upstream_status=upstream_status)
            task.update(outputs=outputs, text=text, usage=usage, error=None)
            return _finish(task, TaskStatus.SUCCEEDED, now)

        return self._change_required(task_id, change, known=lease.document if lease else None)

    def schedule_retry(self, lease: Lease, error: JobError, *, delay: float) -> Task:
        """Close the running attempt as failed-but-retryable and put the task back in the queue."""

        def change(task: Task, extra: _Extra) -> Task:
            self._require(lease, extra)
            _check(TaskStatus(task["status"]), TaskStatus.QUEUED)
            now = time.time()
            _close_open_attempt(
                task, _iso(now), outcome="retry", error_code=error.code, upstream_status=error.upstream_status
            )
            task["status"] = TaskStatus.QUEUED.value
            task["next_attempt_at"] = _iso(now + delay)
            return task

        return self._change_required(lease.task_id, change, known=lease.document)

    def postpone(self, task_id: str, *, delay: float) -> Task | None:
        """Retry a queued task after ``delay`` s (the limiter asked to wait); None if it is not queued."""

        def change(task: Task, extra: _Extra) -> Task | None:
            if task["status"] != TaskStatus.QUEUED:
                return None
            task["next_attempt_at"] = _iso(time.time() + delay)
            return task

        return self._change(task_id, change)

    def fail(self, lease: Lease, error: JobError) -> Task:
        """Fail the task its holder is running, with ``error``."""

        def change(task: Task, extra: _Extra) -> Task:
            self._require(lease, extra)
            _check(TaskStatus(task["status"]), TaskStatus.FAILED)
            now = now_iso()
            _close_open_attempt(
                task, now, outcome="failed", error_code=error.code, upstream_status=error.upstream_status
            )
            return _finish(task, TaskStatus.FAILED, now, error=error.to_record())

        return self._change_required(lease.task_id, change, known=lease.document)

    def cancel(self, task_id: str) -> Task:
        """Cancel a queued or running task; a final one raises ``InvalidTransition`` (409).

        A running attempt is closed as ``canceled`` and its lease dropped: the worker's call may still be
        in flight, but its result is discarded (the task can no longer succeed, and the worker's other
        transitions need the lease).
        """

        def change(task: Task, extra: _Extra) -> Task:
            _check(TaskStatus(task["status"]), TaskStatus.CANCELED)
            now = now_iso()
            _close_open_attempt(task, now, outcome="canceled")
            return _finish(task, TaskStatus.CANCELED, now)

        return self._change_required(task_id, change)

    def _require(self, lease: Lease, extra: _Extra) -> None:
        extra.equal.append([self.key("lease", lease.task_id), lease.token])

    # the one writer ---------------------------------------------------------------------------------
    def _change_required(
        self, task_id: str, change: Callable[[Task, _Extra], Task], *, known: str | bytes | None = None
    ) -> Task:
        task, _ = self._write(task_id, change, known=known)
        assert task is not None
        return task

    def _change(self, task_id: str, change: Callable[[Task, _Extra], Task | None]) -> Task | None:
        return self._write(task_id, change)[0]

    def _write(
        self,
        task_id: str,
        change: Callable[[Task, _Extra], Task | None],
        *,
        known: str | bytes | None = None,
    ) -> tuple[Task | None, str | None]:
        """Apply ``change`` with compare-and-set; return the new task and its document as written.

        ``known``: the document the caller believes is stored; the first try compares against it
        without reading (one round trip instead of two), and reads only if it was not current.
        """
        key = self.key("task", task_id)
        with mapped_redis_errors():
            while True:
                raw, known = (known, None) if known is not None else (self._redis.get(key), None)
                if raw is None:
                    raise NotFound(f"no task with id {task_id!r}", field="id")
                old = json.loads(raw)
                extra = _Extra()
                new = change(json.loads(raw), extra)
                if new is None:
                    return None, None
                self._consequences(old, new, extra)
                document = _dump(new)
                written = self._cas(keys=[key], args=[raw, document, _dump(extra.__dict__)])
                if written == 1:
                    return new, document
                if written == -1:
                    return None, None
                if written == -2:
                    raise LeaseLost(f"the lease on task {task_id} was lost; another worker may run it")

    def _consequences(self, old: Task, new: Task, extra: _Extra) -> None:
        """The bookkeeping that follows from a change, written in the same atomic step."""
        task_id = new["id"]
        status = TaskStatus(new["status"])
        if status.is_final:
            extra.writes += [
                ["SREM", self.key("active"), task_id],
                ["EXPIRE", self.key("task", task_id), str(self._task_retention)],
                ["EXPIRE", self.key("payload", task_id), str(self._payload_retention)],
            ]
        if status == TaskStatus.QUEUED and new["next_attempt_at"]:
            due = str(_epoch_ms(new["next_attempt_at"]))
            extra.writes += [
                ["ZADD", self.key("delayed"), due, task_id],
                ["ZREM", self.key("queued"), task_id],
            ]
        elif status != TaskStatus.QUEUED:
            extra.writes += [["ZREM", self.key("queued"), task_id], ["ZREM", self.key("delayed"), task_id]]
        if status.is_final:
            extra.writes.append(["DEL", self.key("result", task_id)])
        if status != TaskStatus.RUNNING:
            extra.writes += [["DEL", self.key("lease", task_id)], ["ZREM", self.key("running"), task_id]]
        webhook = new.get("webhook")
        first_time = status != TaskStatus.RUNNING or old["started_at"] is None
        if webhook and status.value in webhook["events"] and old["status"] != status and first_time:
            event_id = f"msg_{task_id}_{status.value}"
            event = {
                "id": event_id,
                "task_id": task_id,
                "type": f"task.{status.value}",
                "timestamp": now_iso(),
                "task": new,
            }
            extra.writes += [
                ["SET", self.key("wh", "event", event_id), _dump(event), "NX"],
                ["ZADD", self.key("wh", "due"), "NX", str(_now_ms()), event_id],
            ]


# Errors that cost the upstream nothing and are waited out instead of using up a task's attempts.
FREE_ERROR_CODES = frozenset({"upstream_rate_limited", "upstream_quota_exhausted"})


def attempts_used(task: Task) -> int:
    """The attempts that count against MAX_ATTEMPTS: all but those refused for rate or quota."""
    return sum(1 for attempt in task["attempts"] if attempt["error_code"] not in FREE_ERROR_CODES)


def _now_ms() -> int:
    return round(time.time() * 1000)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


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
        duration_ms=_epoch_ms(now) - _epoch_ms(attempt["started_at"]),
    )


@contextmanager
def mapped_redis_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"the task store (Redis) is unavailable: {exc}") from exc
    except redis.ResponseError as exc:
        if any(word in str(exc) for word in ("MISCONF", "OOM", "LOADING", "READONLY")):
            raise StoreUnavailable(f"the task store (Redis) refused the write: {exc}") from exc
        raise
