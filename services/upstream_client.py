"""The upstream client: one HTTP call to ``{UPSTREAM_BASE_URL}/v1/images/generations``, and the download
of an image the upstream answered with by URL.

It sends the client's request body as it was accepted (our own fields stripped), and returns the raw
answer of a success (the caller parses it and saves it first) or raises the ``UpstreamError``.
httpx's errors are mapped here: a read timeout is ``upstream_timeout``, a connection failure
``upstream_unavailable``, both retryable; their messages name the exception's type only (httpx's text
names hosts and ports; the exception chain keeps it for the logs).

Everything read is capped: the upstream's answer at ``MAX_UPSTREAM_RESPONSE_BYTES`` (a declared
Content-Length above it is refused before anything is allocated; a body of unknown length, or a
compressed one, is read in chunks and dropped once it passes the cap), an image at
``MAX_OUTPUT_IMAGE_BYTES`` within ``IMAGE_DOWNLOAD_TIMEOUT``.

Image URLs (``data[].url``) are the upstream's answer, not the upstream: one on the upstream's origin
(scheme, host and port of ``UPSTREAM_BASE_URL``) is fetched with the upstream's key, as the rest of its
API; any other origin gets no key, only over https (``IMAGE_URL_ALLOW_HTTP``) and only to public
addresses (``IMAGE_URL_ALLOW_PRIVATE``), through the webhooks' address guard (``services/netguard.py``:
resolved and checked where the connection is made, no redirect, no proxy from the environment). Images
are asked for and accepted uncompressed only (``Accept-Encoding: identity``), so nothing is ever
decompressed. What clients see of a failed download is its status or kind, never the answer's body.

Each thread gets its own ``httpx.Client`` for the upstream (one keep-alive connection, two at most):
httpcore's pool scans all its connections on every request and every response closed
(``_assign_requests_to_connections``, quadratic in idle connections), so one pool shared by the worker's
100 threads was a large share of the worker's CPU (see bench/README.md, P1–P5: fix 1, found profiling
P1a). Foreign image URLs share one guarded client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import httpcore
import httpx

from services import metrics
from services.cancellation import InFlightCalls, TrackingBackend
from services.config import Config
from services.errors import AddressNotAllowed, UpstreamError
from services.netguard import deadline, guarded_transport
from services.upstream_response import classify_error

GENERATIONS_PATH = "/v1/images/generations"
USER_AGENT = "imagegen-queue"
# The upstream's answer may come compressed, in what httpx decodes with a bounded ratio: deflate expands
# at most about 1032 times, so one chunk read (64 KiB) decodes to some 66 MB at most before the cap is
# checked. (brotli and zstd, which httpx decodes when their packages are installed, have no such bound.)
# An image comes uncompressed only.
UPSTREAM_ENCODINGS = frozenset({"identity", "gzip", "deflate"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_THREAD_LIMITS = httpx.Limits(max_connections=2, max_keepalive_connections=2)

Origin = tuple[str, str, int | None]


class _NoCookies(httpx.Cookies):
    """A jar that keeps nothing: answers' cookies are not read."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class _CookielessClient(httpx.Client):
    """httpx's client without a cookie jar. The upstream is an API that sets none, and reading every
    answer's headers into a jar (urllib's cookie machinery) was 4 % of a worker's CPU in P6
    (bench/README.md)."""

    @property
    def cookies(self) -> httpx.Cookies:
        return _NoCookies()

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        return None


def origin(url: httpx.URL) -> Origin:
    """Scheme, host and port of ``url``, the port made explicit."""
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


class UpstreamClient:
    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.BaseTransport | None = None,
        calls: InFlightCalls | None = None,
    ) -> None:
        """``calls``: where each thread's connections are recorded, so that a cancel can cut a call off
        (``services/cancellation.py``); ``transport`` replaces the network altogether (tests)."""
        self._config = config
        self._calls = calls
        self._origin = origin(httpx.URL(config.upstream_base_url))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Accept-Encoding": "gzip, deflate",
        }
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
            "transport": transport,
        }
        # one TLS context for all the threads' clients: each would otherwise load the CA bundle (about
        # 1 MB of memory per thread)
        self._ssl_context = httpx.create_ssl_context()
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()
        # Image URLs on other origins: no key, the address guard, each step within the download's time.
        self._foreign = httpx.Client(
            transport=guarded_transport(
                allow_private=config.image_url_allow_private,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=16),
            ),
            headers={"User-Agent": USER_AGENT},
            timeout=httpx.Timeout(config.image_download_timeout),
            follow_redirects=False,
            trust_env=False,
        )

    @property
    def _client(self) -> httpx.Client:
        """This thread's client, made on its first call."""
        client = getattr(self._local, "client", None)
        if client is None:
            transport = self._settings["transport"] or self._transport()
            settings = {**self._settings, "transport": transport}
            client = self._local.client = _CookielessClient(**settings)  # type: ignore[arg-type]
            with self._lock:
                self._clients.append(client)
        return client

    def _transport(self) -> httpx.HTTPTransport:
        """A thread's transport: one keep-alive connection, two at most, each recorded in ``calls``."""
        transport = httpx.HTTPTransport(verify=self._ssl_context, limits=_THREAD_LIMITS)
        if self._calls is not None:
            # httpx has no public hook for the network backend: its pool, built the same way plus ours
            transport._pool = httpcore.ConnectionPool(
                ssl_context=self._ssl_context,
                max_connections=_THREAD_LIMITS.max_connections,
                max_keepalive_connections=_THREAD_LIMITS.max_keepalive_connections,
                keepalive_expiry=_THREAD_LIMITS.keepalive_expiry,
                network_backend=TrackingBackend(self._calls),
            )
        return transport

    def generate(self, body: bytes) -> tuple[int, bytes | bytearray]:
        """Call the upstream once; return the HTTP status and body of a success, else raise its error.
        Counted in the upstream's metrics (in flight, duration, outcome)."""
        with metrics.upstream_request():
            return self._call(body)

    def _call(self, body: bytes) -> tuple[int, bytes | bytearray]:
        """One call. A body of known length is read into one buffer of that size: no list of chunks joined
        into a second copy (a 4K answer is about 13 MB of base64; see ``parse_success`` for the rest).
        """
        limit = self._config.max_upstream_response_bytes
        with _mapped_errors("the upstream"):
            with self._client.stream("POST", GENERATIONS_PATH, content=body) as response:
                if _encoding(response) not in UPSTREAM_ENCODINGS:
                    raise UpstreamError(
                        "the upstream's answer is compressed in an encoding other than gzip or deflate",
                        code="bad_upstream_response",
                        retryable=False,
                        upstream_status=response.status_code,
                    )
                # Not retryable: the call is paid for, and the same request would most likely bring an
                # answer as large again, paid again. Raise MAX_UPSTREAM_RESPONSE_BYTES instead.
                content = _read_capped(
                    response,
                    limit,
                    lambda: UpstreamError(
                        f"the upstream's answer is larger than {limit} bytes (MAX_UPSTREAM_RESPONSE_BYTES)",
                        code="upstream_response_too_large",
                        retryable=False,
                        upstream_status=response.status_code,
                    ),
                )
        if response.is_success:
            return response.status_code, content
        raise classify_error(response.status_code, bytes(content), response.headers)

    def download(self, url: str) -> bytes:
        """Fetch an image the upstream returned by URL (OpenAI-style ``data[].url``), within
        IMAGE_DOWNLOAD_TIMEOUT and MAX_OUTPUT_IMAGE_BYTES; on the upstream's origin with its key, on
        any other through the address guard without it."""
        config = self._config
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise _refused("it is not a valid URL") from None
        guard: AbstractContextManager[None]
        if origin(parsed) in (self._origin, ("", "", None)):  # a path alone: under UPSTREAM_BASE_URL
            client, guard = self._client, nullcontext()
        else:
            if parsed.scheme not in ("https", "http") or (
                parsed.scheme == "http" and not config.image_url_allow_http
            ):
                raise _refused("only https URLs are fetched from another origin than the upstream's")
            client, guard = self._foreign, deadline(config.image_download_timeout)
        limit = config.max_output_image_bytes
        ends = time.monotonic() + config.image_download_timeout
        try:
            with _mapped_errors("the image URL"), guard:
                with client.stream(
                    "GET",
                    parsed,
                    headers={"Accept-Encoding": "identity"},
                    timeout=config.image_download_timeout,
                ) as response:
                    if not response.is_success:
                        raise _download_status_error(response.status_code)
                    if _encoding(response) != "identity":  # asked for identity: no decompression
                        raise UpstreamError(
                            "the image URL answered compressed (Content-Encoding), which is refused",
                            code="output_download_failed",
                            retryable=False,
                            upstream_status=response.status_code,
                        )
                    return bytes(
                        _read_capped(
                            response,
                            limit,
                            lambda: UpstreamError(
                                f"the image at the URL is larger than {limit} bytes",
                                code="output_too_large",
                                retryable=False,
                                upstream_status=response.status_code,
                            ),
                            until=ends,
                        )
                    )
        except AddressNotAllowed as exc:
            raise _refused("its host is not a public address") from exc

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in [*clients, self._foreign]:
            client.close()


@contextmanager
def _mapped_errors(subject: str) -> Iterator[None]:
    """httpx's errors as retryable UpstreamErrors naming ``subject`` and the error's type only."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamError(
            f"{subject} did not answer in time ({type(exc).__name__})", code="upstream_timeout"
        ) from exc
    except httpx.TransportError as exc:
        raise UpstreamError(
            f"{subject} could not be reached ({type(exc).__name__})", code="upstream_unavailable"
        ) from exc


def _refused(why: str) -> UpstreamError:
    return UpstreamError(f"the image URL is refused: {why}", code="output_url_refused", retryable=False)


def _download_status_error(status: int) -> UpstreamError:
    """An image URL's non-2xx answer: retried when a later try may get the image (408, 429, 5xx), not
    otherwise (a 404, a redirect, which is never followed); its body is not read."""
    retryable = status in (408, 429) or status >= 500
    return UpstreamError(
        f"the image URL answered HTTP {status}",
        code="upstream_unavailable" if retryable else "output_download_failed",
        retryable=retryable,
        upstream_status=status,
    )


def _encoding(response: httpx.Response) -> str:
    return str(response.headers.get("content-encoding", "identity")).strip().lower()


def _read_capped(
    response: httpx.Response,
    limit: int,
    too_large: Callable[[], UpstreamError],
    *,
    until: float | None = None,
) -> bytes | bytearray:
    """The whole body, at most ``limit`` bytes (decoded), read by the monotonic time ``until`` if given.

    A declared Content-Length above the limit is refused before anything is read; an uncompressed body
    of declared length is read into one buffer of that size, any other in chunks, checked as they come.
    """
    if response.is_stream_consumed:  # a transport that has read it already (httpx.MockTransport)
        if len(response.content) > limit:
            raise too_large()
        return response.content
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large()
    if not length.isdigit() or _encoding(response) != "identity":
        buffer = bytearray()
        for chunk in response.iter_bytes():
            buffer += chunk
            if len(buffer) > limit:
                raise too_large()
            _check_time(until)
        return buffer
    buffer = bytearray(int(length))
    view = memoryview(buffer)
    filled = 0
    with view:
        for chunk in response.iter_raw():
            if filled + len(chunk) > len(buffer):
                raise httpx.RemoteProtocolError("the answer is longer than its Content-Length")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
            _check_time(until)
    if filled != len(buffer):
        raise httpx.RemoteProtocolError(f"the answer ended after {filled} of {len(buffer)} bytes")
    return buffer


def _check_time(until: float | None) -> None:
    if until is not None and time.monotonic() > until:
        raise httpx.ReadTimeout("the download's deadline has passed")
