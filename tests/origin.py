"""A real HTTP origin for the outbound tests: a server on a free port, in a thread of the test process.

It plays an image host or the upstream itself. Every request is recorded with its method, path and
headers (names lower-cased); each path answers with its ``Answer``, a function that writes the whole
reply: a plain body, a body shorter than it declares, a chunked (endless) stream, a trickle.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devstack.processes import HOST

Answer = Callable[[BaseHTTPRequestHandler], None]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


def body(data: bytes, *, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """``data`` with its Content-Length (and ``headers``)."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return answer


def declared(length: int, data: bytes = b"\x89PNG") -> Answer:
    """A Content-Length of ``length`` and only ``data`` behind it: nothing but the header is needed to
    refuse it (and a reader that trusted it would have to allocate ``length`` bytes)."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        handler.wfile.write(data)

    return answer


def chunked(
    chunk: bytes = b"\x89PNG" + b"\0" * 65532,
    count: int | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> Answer:
    """No Content-Length: ``chunk``, ``count`` times, or until the client goes away (1 GiB at most)."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        handler.send_response(200)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        for _ in range(count if count is not None else 2**30 // len(chunk)):
            handler.wfile.write(framed)
        handler.wfile.write(b"0\r\n\r\n")

    return answer


def trickle(length: int, every: float) -> Answer:
    """Declares ``length`` bytes and sends one every ``every`` seconds: no single read ever waits long,
    the whole takes ``length * every`` seconds."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        server: _Server = handler.server  # type: ignore[assignment]
        for _ in range(length):
            handler.wfile.write(b"\0")
            handler.wfile.flush()
            if server.stopping.wait(every):  # the server's pace; ends at once when it stops
                return

    return answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.stopping = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that stopped reading: expected
            super().handle_error(request, client_address)


class Origin:
    def __init__(self, host: str = HOST) -> None:
        self.requests: list[Request] = []
        self._answers: dict[str, Answer] = {}
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                origin._handle(self)

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                origin._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.host = host
        self._server = _Server((host, 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def url(self, path: str = "") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def answer(self, path: str, answer: Answer) -> None:
        with self._lock:
            self._answers[path] = answer

    def at(self, path: str) -> list[Request]:
        with self._lock:
            return [request for request in self.requests if request.path == path]

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self._lock:
            self.requests.append(Request(handler.command, handler.path, headers))
            answer = self._answers.get(handler.path, body(b"not found", status=404))
        answer(handler)
