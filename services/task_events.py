"""Waiting for a task's status changes: ``Prefer: wait`` and ``GET /v1/tasks/{id}/events``.

The store numbers every change of a task's status. In the same atomic step as the change it appends the
new status to ``{p}:events:{id}`` (entry i, from 1, is event i; the create writes event 1, ``queued``) and
publishes the task's id on ``{p}:task-events`` (``services/store.py``, ``_consequences``).

Each API process holds one subscription to that channel (``TaskEvents``: a listener thread, which is a
greenlet under gunicorn's gevent workers) and fans its messages out to the requests waiting in that
process. A request registers the task it waits for, then reads the task (and its events) from the store,
and reads again each time it is woken. A message says only *when* to read: what a request sends is
always what the store holds, so a message lost (pub/sub is fire-and-forget) costs latency, never an event.
While the subscription is down every request reads again at each check (a poll, every
``CLIENT_CHECK_SECONDS``), and once it is made again every request is woken to read.

A waiting request holds no Redis connection and no thread of its own under gevent: an ``Event`` and a
registry entry. Every ``CLIENT_CHECK_SECONDS`` it asks its ``connected`` callback whether its client is
still there and stops if not, dropping its entry: a client that hangs up leaves nothing behind. A process
nobody waited in for ``IDLE_SECONDS`` drops its subscription too; the next waiter makes it again.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import redis

from services.errors import InvalidRequest
from services.keys import Keys
from services.records import TaskRecord
from services.redis_errors import mapped_redis_errors
from services.store import JobStore, TaskStatus

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 60  # the longest ``Prefer: wait`` is honoured (issue 11; Replicate's limit too)
CLIENT_CHECK_SECONDS = 1.0  # how often a waiting request checks that its client is still connected
RESUBSCRIBE_SECONDS = 1.0  # after the subscription failed, the listener tries again this much later
IDLE_SECONDS = 30.0  # a process without waiters this long drops its subscription (made again when needed)

Connected = Callable[[], bool]
NOT_AN_EVENT_ID = "Last-Event-ID must be the id of an event of this stream"


@dataclass(frozen=True)
class TaskEvent:
    """Event ``seq`` of a task: it became ``status``. ``task`` is the task as read when the event is sent,
    which is later than the event when another change followed before it was sent (on a resume, or a change
    that the next followed within milliseconds): then ``task["status"]`` is already a later one."""

    seq: int
    status: str
    task: TaskRecord


class _Woken(enum.Enum):
    WOKEN = "woken"  # notified, or the subscription is down: read again
    TIMEOUT = "timeout"  # the deadline passed
    GONE = "gone"  # the client hung up


class _Waiter:
    __slots__ = ("woken",)

    def __init__(self) -> None:
        self.woken = threading.Event()


class TaskEvents:
    """One process's subscription to the task events, and the requests of that process waiting on them."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        store: JobStore,
        *,
        client_check: float = CLIENT_CHECK_SECONDS,
        subscribe_timeout: float = 2.0,
        idle: float = IDLE_SECONDS,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._store = store
        self._client_check = client_check
        self._subscribe_timeout = subscribe_timeout
        self._idle = idle
        self._lock = threading.Lock()
        self._waiters: dict[str, set[_Waiter]] = {}
        self._subscribed = threading.Event()
        self._listener: threading.Thread | None = None
        self.subscriptions = 0  # subscriptions made so far by this process (1 unless Redis went away)

    @property
    def waiting(self) -> int:
        """Requests of this process waiting right now."""
        with self._lock:
            return sum(len(waiters) for waiters in self._waiters.values())

    # the use cases ----------------------------------------------------------------------------------
    def wait_final(self, task_id: str, *, tenant: str, timeout: float, connected: Connected) -> TaskRecord:
        """The task of ``tenant`` once it is final, or as it is after ``timeout`` s, or when the client
        hangs up (``NotFound`` for another's task, as ``JobStore.get``)."""
        task = self._store.get(task_id, tenant=tenant)
        if TaskStatus(task["status"]).is_final or timeout <= 0:
            return task
        deadline = time.monotonic() + timeout
        with self._watch(task_id) as waiter:
            while True:
                waiter.woken.clear()
                task = self._store.get(task_id, tenant=tenant)
                if TaskStatus(task["status"]).is_final:
                    return task
                if self._pause(waiter, deadline, connected) is not _Woken.WOKEN:
                    return task

    def stream(
        self, task_id: str, *, after: int, heartbeat: float, connected: Connected
    ) -> Generator[TaskEvent | None, None, None]:
        """The task's events after event ``after``, then each one as it happens, until the final one;
        ``None`` when a heartbeat is due (``heartbeat`` s without an event; at once when there is nothing
        to send at the start, so the client sees the stream open). Ends early if the task is gone
        (deleted, expired) or the client hung up. The caller checks the tenant first.

        An ``after`` beyond the task's last event is ``InvalidRequest`` at once, before the stream starts
        (so it can be a 400): events are numbered in order as they happen, so no stream sent that id,
        and waiting for it would skip the events before it."""
        with mapped_redis_errors():
            last = self._redis.llen(self._keys.events(task_id))
        if after > last:
            raise InvalidRequest(NOT_AN_EVENT_ID, field="Last-Event-ID")
        return self._stream(task_id, after=after, heartbeat=heartbeat, connected=connected)

    def _stream(
        self, task_id: str, *, after: int, heartbeat: float, connected: Connected
    ) -> Generator[TaskEvent | None, None, None]:
        with self._watch(task_id) as waiter:
            sent = after
            beat_at = time.monotonic()
            while True:
                waiter.woken.clear()
                statuses, task = self._events_since(task_id, sent)
                if task is None:
                    return
                for offset, status in enumerate(statuses):
                    yield TaskEvent(sent + 1 + offset, status, task)
                if statuses:
                    sent += len(statuses)
                    beat_at = time.monotonic() + heartbeat
                if TaskStatus(task["status"]).is_final:
                    return  # the events were read with the task: the final one was among them, or sent
                woken = self._pause(waiter, beat_at, connected)
                if woken is _Woken.GONE:
                    return
                if woken is _Woken.TIMEOUT:
                    yield None
                    beat_at = time.monotonic() + heartbeat

    def _events_since(self, task_id: str, after: int) -> tuple[list[str], TaskRecord | None]:
        """The statuses of the task's events after event ``after``, and the task, read in one transaction
        (so the task is as the last of those events left it)."""
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.lrange(self._keys.events(task_id), after, -1)
            pipe.get(self._keys.task(task_id))
            statuses, raw = pipe.execute()
        task = cast("TaskRecord", json.loads(raw)) if raw is not None else None
        return [status.decode() for status in statuses], task

    # waiting ----------------------------------------------------------------------------------------
    @contextmanager
    def _watch(self, task_id: str) -> Iterator[_Waiter]:
        """Register a waiter for ``task_id`` for the block; the subscription is live (or was given
        ``subscribe_timeout`` to be) before the block reads anything, so no change falls in between."""
        waiter = _Waiter()
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(waiter)
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="task-events", daemon=True)
                self._listener.start()
        try:
            self._subscribed.wait(self._subscribe_timeout)
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiters.get(task_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[task_id]

    def _pause(self, waiter: _Waiter, until: float, connected: Connected) -> _Woken:
        """Wait until woken, ``until`` (monotonic), or the client is gone, checking it now and then."""
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return _Woken.TIMEOUT
            if waiter.woken.wait(min(remaining, self._client_check)):
                return _Woken.WOKEN
            if not connected():
                return _Woken.GONE
            if not self._subscribed.is_set():
                return _Woken.WOKEN  # no subscription: poll

    def _wake(self, task_id: str | None) -> None:
        """Wake the waiters of ``task_id`` (None: every waiter)."""
        with self._lock:
            if task_id is None:
                woken = [waiter for waiters in self._waiters.values() for waiter in waiters]
            else:
                woken = list(self._waiters.get(task_id, ()))
        for waiter in woken:
            waiter.woken.set()

    def _listen(self) -> None:
        """The process's subscription while it has waiters: made again after a failure, dropped once
        nobody waited for ``idle`` s (the next waiter starts a new listener)."""
        while True:
            failed = False
            try:
                self._listen_once()
            except Exception as exc:  # noqa: BLE001 - whatever broke it, the waiters need it made again
                failed = True
                log.warning("task events: subscription lost (%s)", type(exc).__name__)
            self._subscribed.clear()
            if self._retire():
                return
            if failed:
                self._wake(None)  # they poll until the subscription is back
                time.sleep(RESUBSCRIBE_SECONDS)

    def _retire(self) -> bool:
        """Stop being the listener if nobody waits (under the lock, so a new waiter starts a new one)."""
        with self._lock:
            if self._waiters:
                return False
            self._listener = None
            return True

    def _listen_once(self) -> None:
        """Subscribe and fan messages out; return once nobody waited for ``idle`` s."""
        pubsub: Any = self._redis.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._keys.task_events)
            idle_since = time.monotonic()
            while True:
                message = pubsub.get_message(timeout=1.0)
                if self._waiters:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self._idle:
                    return
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    self.subscriptions += 1
                    self._subscribed.set()
                    self._wake(None)  # anything published before this was missed: read again
                elif message["type"] == "message":
                    self._wake(message["data"].decode())
        finally:
            pubsub.close()
