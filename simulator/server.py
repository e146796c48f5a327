"""The HTTP server: the upstream endpoint plus /_sim/ endpoints for tests and benchmarks."""

from __future__ import annotations

import logging
import select
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from simulator.config import SimConfig
from simulator.dimensions import image_dimensions
from simulator.directive import Directive, DirectiveError, find_directive
from simulator.faults import draw
from simulator.images import ImageCache, ImageSpec, RenderedImage
from simulator.replies import Reply, error_reply, failure_reply, json_reply, success_reply
from simulator.state import CallRecord, SimState
from simulator.validation import GenerationRequest, InvalidRequest, parse_request

__all__ = ["SimConfig", "SimServer", "make_server", "start_in_thread"]

GENERATIONS_PATH = "/v1/images/generations"
IMAGES_PREFIX = "/_sim/images/"
_HOLD_POLL_S = 0.2

log = logging.getLogger("simulator")


class SimServer(ThreadingHTTPServer):
    """Threaded HTTP/1.1 server; shutdown() also releases requests that are being held.

    server_close() does not wait for handler threads (idle keep-alive connections would block it).
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], config: SimConfig) -> None:
        self.config = config
        self.state = SimState()
        self.images = ImageCache()
        self.stopping = threading.Event()
        super().__init__(address, SimHandler)

    def server_bind(self) -> None:
        # Skip HTTPServer's getfqdn() reverse lookup, which can be slow.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


class SimHandler(BaseHTTPRequestHandler):
    """Routes one connection's requests (keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "imagegen-sim/1"
    disable_nagle_algorithm = True
    server: SimServer

    def do_POST(self) -> None:
        body = self._read_body()
        if body is None:
            return
        path = urlsplit(self.path).path
        if path == GENERATIONS_PATH:
            self._generation(body)
        elif path == "/_sim/reset":
            self.server.state.reset()
            self._send(json_reply(200, {"reset": True}))
        else:
            self._send(_not_found(path))

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        state = self.server.state
        if path == "/_sim/stats":
            self._send(json_reply(200, state.stats()))
        elif path == "/_sim/calls":
            self._send(json_reply(200, state.calls()))
        elif path.startswith(IMAGES_PREFIX) and (image := state.image(path[len(IMAGES_PREFIX) :])):
            query = parse_qs(urlsplit(self.path).query)
            fails = int(query.get("fail", ["0"])[0])
            if state.next_download(query.get("key", [""])[0]) < fails:
                self._send(error_reply(503, "UNAVAILABLE", "The image is not available yet."))
            else:
                self._send(Reply(200, (image.data,), image.mime_type))
        else:
            self._send(_not_found(path))

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering a request whose body cannot be read."""
        length = self.headers.get("Content-Length")
        if length is None and "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(error_reply(411, "INVALID_ARGUMENT", "Content-Length is required."))
            return None
        size = int(length) if (length or "0").isdigit() else -1
        if size < 0:
            self.close_connection = True
            self._send(error_reply(400, "INVALID_ARGUMENT", "Invalid Content-Length."))
            return None
        return self.rfile.read(size)

    def _generation(self, body: bytes) -> None:
        state = self.server.state
        record = state.begin_call()
        try:
            outcome, reply = self._answer_generation(body, record)
            state.settle_call(record, outcome, reply.status if reply else None)
            if reply is not None:
                self._send(reply)
        finally:
            state.finish_call(record)
            log.info(
                "call key=%s model=%s outcome=%s status=%s ms=%.0f",
                record.key, record.model, record.outcome, record.status, record.duration_s() * 1000,
            )  # fmt: skip

    def _answer_generation(self, body: bytes, record: CallRecord) -> tuple[str, Reply | None]:
        """Decide the call's outcome and wait as configured; returns it and the reply (None: client gone)."""
        config, state = self.server.config, self.server.state
        if config.api_key and self.headers.get("Authorization") != f"Bearer {config.api_key}":
            message = "API key not valid. Please pass a valid API key."
            return "unauthorized", error_reply(401, "PERMISSION_DENIED", message)
        try:
            request = parse_request(body)
            directive = find_directive(request.texts) or Directive()
        except (InvalidRequest, DirectiveError) as exc:
            return "invalid", error_reply(400, "INVALID_ARGUMENT", str(exc))
        record.model, record.key = request.model, directive.key
        drawn = draw(config, body, state.next_occurrence(body))
        outcome = drawn.fault or "ok"
        if directive.key is not None:
            position = state.next_position(directive.key)
            if directive.script:
                outcome = directive.script[min(position, len(directive.script) - 1)]
        delay_s = drawn.latency_s if directive.delay_ms is None else directive.delay_ms / 1000
        if not self._hold(delay_s):
            return outcome, None
        if outcome == "timeout":
            hang_s = config.hang_s if directive.hang_s is None else directive.hang_s
            return outcome, failure_reply("504", request.model, "") if self._hold(hang_s) else None
        if outcome == "ok":
            return outcome, self._success(request, directive)
        retry_delay = directive.retry_delay or f"{config.retry_delay_s:g}s"
        return outcome, failure_reply(outcome, request.model, retry_delay)

    def _success(self, request: GenerationRequest, directive: Directive) -> Reply:
        config = self.server.config
        width, height = image_dimensions(request.model, request.aspect_ratio, request.image_size)
        spec = ImageSpec(width, height, directive.image_format or config.image_format, config.image_bytes)
        return success_reply(
            directive.shape,
            request.model,
            spec,
            self.server.images,
            lambda image: self._url(image, directive),
        )

    def _url(self, image: RenderedImage, directive: Directive) -> str:
        self.server.state.remember_image(image)
        host = self.headers.get("Host") or f"{self.server.server_name}:{self.server.server_port}"
        query = urlencode({"key": directive.key or "", "fail": directive.download_fails})
        return f"http://{host}{IMAGES_PREFIX}{image.image_id}?{query}"

    def _hold(self, seconds: float) -> bool:
        """Wait up to seconds, ending early on server shutdown; False if the client disconnected."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        while (remaining := deadline - time.monotonic()) > 0 and not self.server.stopping.is_set():
            if poller.poll(min(remaining, _HOLD_POLL_S) * 1000):
                if _peer_closed(self.connection):
                    self.close_connection = True
                    return False
                poller.unregister(self.connection)  # pipelined data is waiting: stop watching
        return True

    def _send(self, reply: Reply) -> None:
        """Write reply; a client that has gone just ends the connection."""
        try:
            self.send_response(reply.status)
            if reply.content_type:
                self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(reply.length))
            if self.server.stopping.is_set():
                self.send_header("Connection", "close")
            self.end_headers()
            for chunk in reply.chunks:
                self.wfile.write(chunk)
        except OSError:
            self.close_connection = True


def _peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _not_found(path: str) -> Reply:
    return error_reply(404, "NOT_FOUND", f"No route for {path}.")


def make_server(host: str, port: int, config: SimConfig) -> SimServer:
    """A bound simulator server; run it with serve_forever(), stop it with shutdown() and server_close()."""
    return SimServer((host, port), config)


def start_in_thread(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[SimServer, str]:
    """Start a server on a daemon thread; returns it and its base URL (port 0 picks a free port)."""
    server = make_server(host, port, config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, f"http://{host}:{server.server_port}"
