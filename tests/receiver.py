"""A real webhook receiver for the tests: an HTTP server on a free port, in a thread of the test process.

Each path answers from its script (status codes in order, the last one repeated; 200 by default) and
every request is recorded with its headers, body and arrival time. Every signature is verified as it
arrives with the ``standardwebhooks`` package, the specification's reference implementation, not with
our own code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook

from devstack.processes import HOST, wait_until

HOLD = "hold"  # a scripted answer: keep the request open until ``release()``, then answer 200


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    arrived: float
    payload: Any = None  # what Webhook.verify returned
    verify_error: str | None = None

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the default listen backlog (5) drops SYNs of a burst: 1 s retransmits


class Receiver:
    def __init__(self, secret: str, port: int = 0) -> None:
        self.secret = secret
        self.received: list[Received] = []
        self._scripts: dict[str, list[Response | str]] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else a small answer can wait for a delayed ACK (~40 ms)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                answer = receiver._record(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if answer == HOLD:
                    receiver._released.wait(30)
                    answer = Response(200)
                assert isinstance(answer, Response)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Server((HOST, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def script(self, path: str, answers: Sequence[int | Response | str]) -> None:
        """How ``path`` answers, in order; the last answer repeats."""
        with self._lock:
            self._scripts[path] = [Response(a) if isinstance(a, int) else a for a in answers]

    def release(self) -> None:
        self._released.set()

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [item for item in self.received if item.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 20) -> list[Received]:
        wait_until(lambda: len(self.at(path)) >= count, timeout=timeout, what=f"{count} request(s) at {path}")
        return self.at(path)

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> Response | str:
        item = Received(path, headers, body, time.time())
        try:
            item.payload = Webhook(self.secret).verify(body, headers)
        except Exception as exc:  # noqa: BLE001 - recorded; the tests assert there is none
            item.verify_error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.received.append(item)
            script = self._scripts.get(path, [Response(200)])
            answer = script.pop(0) if len(script) > 1 else script[0]
        return answer
