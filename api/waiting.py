"""HTTP for the requests that wait (``services/task_events.py``): ``Prefer: wait``, whether the client is
still connected, and the Server-Sent Events format of ``GET /v1/tasks/{id}/events``.

The API runs under gunicorn's gevent workers (Dockerfile), so a waiting request is a greenlet, not a thread;
nothing here blocks (the waiting itself is ``TaskEvents``', on gevent-patched events).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

from services.errors import InvalidRequest, ServiceError
from services.prefer import wait_preference
from services.records import TaskRecord
from services.serialization import dumps
from services.task_events import MAX_WAIT_SECONDS, NOT_AN_EVENT_ID, Connected, TaskEvent

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # the latter: nginx, don't buffer
HEARTBEAT = ": keep-alive\n\n"
_TCP_ESTABLISHED = 1  # struct tcp_info's first byte, tcpi_state (linux/tcp_states.h)


def requested_wait(prefer: list[str]) -> int | None:
    """Seconds the client prefers to wait (``Prefer: wait[=N]``, capped at ``MAX_WAIT_SECONDS``), or None:
    no wait asked for, an unusable value (ignored, as RFC 7240 says), or 0 (``services/prefer.py``)."""
    return wait_preference(prefer, maximum=MAX_WAIT_SECONDS)


def last_event_id(header: str | None) -> int:
    """The ``Last-Event-ID`` a reconnecting client sends: the last event it has (0: none). Whether the
    task has had that event is the stream's to check (``TaskEvents.stream``)."""
    if header is None or not header.strip():
        return 0
    value = header.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise InvalidRequest(NOT_AN_EVENT_ID, field="Last-Event-ID")
    return int(value)


def client_connected(environ: Mapping[str, Any]) -> Connected:
    """Whether the request's client is still connected, asked without reading from it (which would take
    what it sends next): the TCP state of its socket (gunicorn's or werkzeug's), which leaves
    ``ESTABLISHED`` once the client closed or reset the connection. No ``select``: its limit of 1,024 file
    descriptors is far below the connections one gevent process holds. Where the state cannot be read
    (not Linux, a Unix socket), the answer is always yes: the wait then lasts its time."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    tcp_info = getattr(socket, "TCP_INFO", None)
    if not isinstance(sock, socket.socket) or tcp_info is None:
        return lambda: True

    def connected() -> bool:
        if sock.fileno() < 0:  # closed on our side
            return False
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0]
        except OSError as exc:
            return exc.errno not in (errno.EBADF, errno.ENOTCONN)
        return bool(state == _TCP_ESTABLISHED)

    return connected


def event_stream(
    events: Generator[TaskEvent | None, None, None], view: Callable[[TaskRecord], dict[str, Any]]
) -> Iterator[str]:
    """The events as Server-Sent Events: ``id:`` the event's number, ``event:`` the status, ``data:`` the
    task as ``view`` shows it; a comment for a heartbeat. A store failure ends the stream (the client
    reconnects with ``Last-Event-ID`` and misses nothing); a client gone closes ``events``."""
    try:
        for event in events:
            if event is None:
                yield HEARTBEAT
            else:
                yield f"id: {event.seq}\nevent: {event.status}\ndata: {dumps(view(event.task))}\n\n"
    except ServiceError as exc:
        log.warning("event stream ended: %s", exc.message)
    finally:
        events.close()
