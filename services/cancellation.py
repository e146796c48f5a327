"""A cancel that stops paying: the running task's upstream call is cut off, not waited for.

``POST /v1/tasks/{id}/cancel`` closes the task's attempt in the store, then publishes the task's id on
``{p}:cancels`` (``CancelSignal.publish``). Every generation worker process listens there
(``CancelListener``, a bootstep) and, if one of its threads is calling the upstream for that task, shuts
that call's connection down (``InFlightCalls.abort``): the read in progress fails at once, the upstream
sees its client go, and the thread records nothing (its call's error is ``CallCutOff``: the cancel closed
the attempt already, and the store would refuse its writes), releases its limiter slot and admits the
next task.

To cut a call off from another thread, the upstream client's connections are made through
``TrackingBackend``, which records each thread's sockets; ``socket.shutdown`` (not ``close``) wakes a
thread blocked in ``recv``. A thread runs one call at a time on its own client (``upstream_client``),
so the sockets of the thread that runs a task's call are that call's.

Pub/sub is fire-and-forget: a worker that is reconnecting when the cancel is published does not cut its
call off; the call runs to its end and its answer is refused, as before this existed.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import redis

from services.errors import CallCutOff
from services.keys import Keys
from services.periodic import Periodic
from services.redis_errors import mapped_redis_errors

log = logging.getLogger(__name__)


class InFlightCalls:
    """The upstream calls this process has in flight, by task, and the sockets of each thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: dict[int, list[socket.socket]] = {}
        self._threads: dict[str, int] = {}
        self.aborted: set[str] = set()

    def track(self, sock: socket.socket) -> None:
        """Remember a socket the current thread opened (``TrackingBackend``); closed ones are forgotten."""
        thread = threading.get_ident()
        with self._lock:
            live = [known for known in self._sockets.get(thread, []) if known.fileno() != -1]
            self._sockets[thread] = [*live, sock]

    @contextmanager
    def calling(self, task_id: str) -> Iterator[None]:
        """The current thread calls the upstream for ``task_id`` while the block runs. The error of a call
        ``abort`` cut off (its connection shut down) is ``CallCutOff``: the expected end of a canceled
        task's call, not the upstream's failure."""
        with self._lock:
            self._threads[task_id] = threading.get_ident()
        try:
            yield
        except Exception as exc:
            with self._lock:
                cut_off = task_id in self.aborted
            if cut_off:
                raise CallCutOff(
                    f"task {task_id}: its upstream call was cut off: the task was canceled"
                ) from exc
            raise
        finally:
            with self._lock:
                self._threads.pop(task_id, None)
                self.aborted.discard(task_id)

    def abort(self, task_id: str) -> bool:
        """Cut off the call in flight for ``task_id``; False if this process has none."""
        with self._lock:
            thread = self._threads.get(task_id)
            sockets = list(self._sockets.get(thread, [])) if thread is not None else []
            if thread is not None:
                self.aborted.add(task_id)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile
                pass
        return thread is not None


class TrackingBackend(httpcore.SyncBackend):
    """httpcore's network backend, recording every socket it opens in ``calls``."""

    def __init__(self, calls: InFlightCalls) -> None:
        self._calls = calls

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        self._calls.track(stream.get_extra_info("socket"))
        return stream


class CancelSignal:
    """Publishes canceled task ids to every worker process."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self.channel = keys.cancels

    def publish(self, *task_ids: str) -> None:
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.publish(self.channel, task_id)
            pipe.execute()


class CancelListener:
    """A worker process's subscription: aborts the calls of canceled tasks it runs. It resubscribes
    after a Redis outage (``Periodic`` retries a failed step after a second)."""

    def __init__(self, client: redis.Redis, keys: Keys, calls: InFlightCalls) -> None:
        self._redis = client
        self._channel = keys.cancels
        self._calls = calls
        self._stopping = threading.Event()
        self._periodic = Periodic("cancel-listener", 0.05, self._listen)

    def _listen(self) -> bool:
        with mapped_redis_errors():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self._channel)
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        task_id = message["data"].decode()
                        if self._calls.abort(task_id):
                            log.info("task %s: canceled; its upstream call is cut off", task_id)
            finally:
                pubsub.close()
        return False

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._stopping.set()
        self._periodic.stop()
