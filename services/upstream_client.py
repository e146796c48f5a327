"""The upstream client: one HTTP call to ``{UPSTREAM_BASE_URL}/v1/images/generations``.

It sends the client's request body as it was accepted (our own fields stripped), and returns the raw
answer of a success (the caller parses it and saves it first) or raises the ``UpstreamError``.
httpx's errors are mapped here: a read timeout is ``upstream_timeout``, a connection failure
``upstream_unavailable``, both retryable.

Each thread gets its own ``httpx.Client`` (one keep-alive connection, two at most): httpcore's pool scans
all its connections on every request and every response closed (``_assign_requests_to_connections``,
quadratic in idle connections), so one pool shared by the worker's 100 threads was a large share of
the worker's CPU (see bench/README.md, P1–P5: fix 1, found profiling P1a).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from services.config import Config
from services.errors import UpstreamError
from services.upstream_response import classify_error

GENERATIONS_PATH = "/v1/images/generations"


class UpstreamClient:
    def __init__(self, config: Config, *, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "imagegen-queue"}
        if config.upstream_api_key:
            headers["Authorization"] = f"Bearer {config.upstream_api_key}"
        self._settings = {
            "base_url": config.upstream_base_url,
            "headers": headers,
            "timeout": httpx.Timeout(
                connect=config.upstream_connect_timeout,
                read=config.upstream_timeout,
                write=config.upstream_timeout,
                pool=config.upstream_timeout,
            ),
            "limits": httpx.Limits(max_connections=2, max_keepalive_connections=2),
            "transport": transport,
            # one TLS context for all the threads' clients: each would otherwise load the CA bundle
            # (about 1 MB of memory per thread)
            "verify": httpx.create_ssl_context(),
        }
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()

    @property
    def _client(self) -> httpx.Client:
        """This thread's client, made on its first call."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(**self._settings)  # type: ignore[arg-type]
            with self._lock:
                self._clients.append(client)
        return client

    def generate(self, body: bytes) -> tuple[int, bytes | bytearray]:
        """Call the upstream once; return the HTTP status and body of a success, else raise its error.

        A body of known length is read into one buffer of that size: no list of chunks joined into a
        second copy (a 4K answer is about 13 MB of base64; see ``parse_success`` for the rest).
        """
        with self._mapped_errors():
            with self._client.stream("POST", GENERATIONS_PATH, content=body) as response:
                content = _read_into_one_buffer(response)
        if response.is_success:
            return response.status_code, content
        raise classify_error(response.status_code, bytes(content), response.headers)

    def download(self, url: str) -> bytes:
        """Fetch an image the upstream returned by URL (OpenAI-style ``data[].url``)."""
        with self._mapped_errors():
            response = self._client.get(url)
        if not response.is_success:
            raise classify_error(response.status_code, response.content, response.headers)
        return response.content

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    @contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise UpstreamError(
                f"the upstream did not answer in time ({type(exc).__name__})", code="upstream_timeout"
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamError(
                f"the upstream could not be reached: {type(exc).__name__}: {exc}",
                code="upstream_unavailable",
            ) from exc


def _read_into_one_buffer(response: httpx.Response) -> bytes | bytearray:
    """The whole body: into a buffer of its declared length when it has one and is not compressed."""
    if response.is_stream_consumed:  # a transport that has read it already (httpx.MockTransport)
        return response.content
    length = response.headers.get("content-length", "")
    if not length.isdigit() or response.headers.get("content-encoding", "identity") != "identity":
        return response.read()
    buffer = bytearray(int(length))
    view = memoryview(buffer)
    filled = 0
    with view:
        for chunk in response.iter_raw():
            if filled + len(chunk) > len(buffer):
                raise httpx.RemoteProtocolError("the upstream sent more than its Content-Length")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    if filled != len(buffer):
        raise httpx.RemoteProtocolError(f"the upstream's answer ended after {filled} of {len(buffer)} bytes")
    return buffer
