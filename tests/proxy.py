"""A recording HTTP proxy in front of the API, for the client's tests: a real server on a free port, in
a thread of the test process, that forwards every request to the API and records what it saw.

Two things it can add, each to test a path of the SDK against real answers:

- ``drop_first_submission``: the first ``POST /v1/images/generations`` reaches the API (which creates the
  task), but its answer is never sent back: the connection is closed, as a network cut after the server
  handled the request would do.
- ``events``: ``GET /v1/tasks/{id}/events``, Server-Sent Events as the task-management issue describes
  them (``id:`` a sequence number, ``event:`` the status, ``data:`` the task as ``GET`` shows it, one
  event per change, a heartbeat comment, the end after the final event; ``Last-Event-ID`` resumes), made
  by polling the API, and the path in ``/openapi.json``, so that a client finds it there.
  ``break_first_stream``: the first stream is cut after its first event. Without ``events`` the path is
  taken out of ``/openapi.json``: the API has its own stream now, and the proxy plays a server without one.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from devstack.processes import HOST

EVENTS_PATH = "/v1/tasks/{task_id}/events"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date"}
_FINAL = {"succeeded", "failed", "canceled"}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    status: int | None = None  # what the API answered (None: not forwarded)
    answer: dict[str, Any] | None = None  # its JSON body, if any
    answer_headers: dict[str, str] | None = None
    dropped: bool = False


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class Proxy:
    def __init__(
        self,
        target: str,
        *,
        drop_first_submission: bool = False,
        events: bool = False,
        break_first_stream: bool = False,
    ) -> None:
        self.target = target.rstrip("/")
        self.seen: list[Seen] = []
        self._drop = drop_first_submission
        self._events = events
        self._break_stream = break_first_stream
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy._handle(self)

            def do_POST(self) -> None:
                proxy._handle(self)

            def do_PUT(self) -> None:
                proxy._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def requests_to(self, method: str, path_start: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.method == method and seen.path.startswith(path_start)]

    # handling ---------------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {name.lower(): value for name, value in handler.headers.items()}
        body = handler.rfile.read(int(headers.get("content-length", 0) or 0))
        path = handler.path
        if self._events and handler.command == "GET" and path.endswith("/events"):
            self._record(Seen("GET", path, headers))
            self._stream_events(handler, path.removesuffix("/events"), headers.get("last-event-id"))
            return
        forwarded = {
            name: value for name, value in headers.items() if name not in _HOP_BY_HOP and name != "host"
        }
        response = self._http.request(handler.command, self.target + path, content=body, headers=forwarded)
        answer = _json(response)
        if path == "/openapi.json" and answer is not None:
            if self._events:
                answer["paths"][EVENTS_PATH] = {
                    "get": {"summary": "a task's status changes, as Server-Sent Events"}
                }
            else:
                answer["paths"].pop(EVENTS_PATH, None)
            content = json.dumps(answer).encode()
        else:
            content = response.content
        drop = handler.command == "POST" and path == "/v1/images/generations" and self._take_drop()
        self._record(
            Seen(handler.command, path, headers, response.status_code, answer, dict(response.headers), drop)
        )
        if drop:
            handler.close_connection = True  # the answer is lost: the client sees the connection close
            return
        handler.send_response(response.status_code)
        for name, value in response.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    def _stream_events(self, handler: BaseHTTPRequestHandler, task_path: str, last_id: str | None) -> None:
        """Poll the task and send one event per status change, until it is final."""
        task = self._http.get(self.target + task_path, headers=_auth(handler))
        if task.status_code != 200:
            handler.send_response(task.status_code)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(task.content)))
            handler.end_headers()
            handler.wfile.write(task.content)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")  # the body ends when the stream does
        handler.end_headers()
        handler.close_connection = True
        sequence, sent_status, heartbeat = int(last_id or 0), None, time.monotonic()
        with self._lock:
            cut = self._break_stream
            self._break_stream = False
        while True:
            view = task.json()
            if view["status"] != sent_status:
                sequence += 1
                sent_status = view["status"]
                handler.wfile.write(
                    f"id: {sequence}\nevent: {sent_status}\ndata: {json.dumps(view)}\n\n".encode()
                )
                handler.wfile.flush()
                if sent_status in _FINAL or cut:
                    return
            if time.monotonic() - heartbeat > 0.5:
                handler.wfile.write(b": heartbeat\n\n")
                handler.wfile.flush()
                heartbeat = time.monotonic()
            time.sleep(0.05)
            task = self._http.get(self.target + task_path, headers=_auth(handler))

    def _take_drop(self) -> bool:
        with self._lock:
            drop, self._drop = self._drop, False
            return drop

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)


def _auth(handler: BaseHTTPRequestHandler) -> dict[str, str]:
    value = handler.headers.get("Authorization")
    return {"Authorization": value} if value else {}


def _json(response: httpx.Response) -> dict[str, Any] | None:
    try:
        value = response.json()
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
