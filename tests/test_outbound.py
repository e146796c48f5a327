"""What the worker fetches, on real HTTP servers (``tests/origin.py``): the upstream's answer and the images
its answer points to, each capped in size and time; the upstream's key goes to the upstream's origin only.

Each test has an upstream origin (``UPSTREAM_BASE_URL``) and a foreign one (another port, or 127.0.0.2);
``UpstreamClient`` talks to both over real sockets, the foreign one through the address guard.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from devstack.processes import free_port
from services.config import load_config
from services.errors import UpstreamError
from services.upstream_client import GENERATIONS_PATH, UpstreamClient, origin
from tests.origin import Answer, Origin, body, chunked, declared, trickle

KEY = "sk-upstream-secret"
CAP = 64 * 1024  # MAX_OUTPUT_IMAGE_BYTES and MAX_UPSTREAM_RESPONSE_BYTES
SECRET = "SECRET-BODY-TEXT"  # in the body of every error answer: never in a message
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
MakeClient = Callable[..., UpstreamClient]


@pytest.fixture
def upstream() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.stop()


@pytest.fixture
def foreign() -> Iterator[Origin]:
    server = Origin()  # same host, another port: another origin
    yield server
    server.stop()


@pytest.fixture
def make_client(upstream: Origin) -> Iterator[MakeClient]:
    """``make_client(**config overrides)``: a client whose upstream is ``upstream``, with the flags that
    let it fetch from the foreign origin on 127.0.0.1 over http, a 1 s download and 64 KiB caps."""
    made: list[UpstreamClient] = []

    def make(**overrides: Any) -> UpstreamClient:
        config = load_config(
            {
                "UPSTREAM_BASE_URL": upstream.url(),
                "UPSTREAM_API_KEY": KEY,
                "MAX_OUTPUT_IMAGE_BYTES": str(CAP),
                "MAX_UPSTREAM_RESPONSE_BYTES": str(CAP),
                "IMAGE_DOWNLOAD_TIMEOUT": "1",
                "IMAGE_URL_ALLOW_HTTP": "true",
                "IMAGE_URL_ALLOW_PRIVATE": "true",
            }
        )
        made.append(UpstreamClient(replace(config, **overrides)))
        return made[-1]

    yield make
    for client in made:
        client.close()


def failure(call: Callable[[], object]) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        call()
    error = caught.value
    assert SECRET not in error.message and "Errno" not in error.message, error.message
    return error


def serving(side: str, upstream: Origin, foreign: Origin, path: str, answer: Answer) -> str:
    """The URL of ``path`` on the upstream's origin or the foreign one, answering ``answer``."""
    server = upstream if side == "upstream" else foreign
    server.answer(path, answer)
    return server.url(path)


SIDES = pytest.mark.parametrize("side", ["upstream", "foreign"])

# ---------------------------------------------------------------- the upstream's key


def test_the_upstream_key_goes_to_the_upstreams_origin_only(
    upstream: Origin, foreign: Origin, make_client: MakeClient
) -> None:
    other_host = Origin("127.0.0.2")
    try:
        for server in (upstream, foreign, other_host):
            server.answer("/img.png", body(PNG, headers={"Content-Type": "image/png"}))
        client = make_client()
        for url in (
            upstream.url("/img.png"),
            "/img.png",
            foreign.url("/img.png"),
            other_host.url("/img.png"),
        ):
            assert client.download(url) == PNG
    finally:
        other_host.stop()
    # The absolute URL on the upstream's origin and the relative one (under UPSTREAM_BASE_URL) carry it.
    assert [r.headers.get("authorization") for r in upstream.at("/img.png")] == [f"Bearer {KEY}"] * 2
    for server in (foreign, other_host):
        [request] = server.at("/img.png")
        assert "authorization" not in request.headers, "another origin never gets the upstream's key"
    for request in upstream.requests + foreign.requests + other_host.requests:
        assert request.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("url", "same"),
    [
        ("http://127.0.0.1:8100/_sim/images/1?key=a", True),
        ("HTTP://127.0.0.1:8100/x", True),
        ("http://127.0.0.1:8101/x", False),
        ("https://127.0.0.1:8100/x", False),
        ("http://127.0.0.2:8100/x", False),
        ("http://localhost:8100/x", False),
    ],
)
def test_an_origin_is_scheme_host_and_port(url: str, same: bool) -> None:
    assert (origin(httpx.URL(url)) == origin(httpx.URL("http://127.0.0.1:8100"))) == same
    assert origin(httpx.URL("https://gw.example/v1")) == origin(httpx.URL("https://GW.example:443"))


# ---------------------------------------------------------------- where foreign images come from


@pytest.mark.parametrize(
    ("url", "overrides"),
    [
        ("http://127.0.0.1:{port}/img.png", {"image_url_allow_http": False}),
        ("https://127.0.0.1:{port}/img.png", {"image_url_allow_private": False}),
        ("http://127.0.0.1:{port}/img.png", {"image_url_allow_private": False}),
        ("http://localhost:{port}/img.png", {"image_url_allow_private": False}),
        ("http://169.254.169.254/latest/meta-data/", {}),
        ("ftp://127.0.0.1:{port}/img.png", {}),
        ("file:///etc/passwd", {}),
    ],
    ids=["http", "https-loopback", "loopback", "name-of-loopback", "metadata-even-if-private", "ftp", "file"],
)
def test_foreign_images_are_fetched_over_https_from_public_addresses_only(
    foreign: Origin, make_client: MakeClient, url: str, overrides: dict[str, bool]
) -> None:
    foreign.answer("/img.png", body(PNG))
    error = failure(lambda: make_client(**overrides).download(url.format(port=foreign.port)))
    assert (error.code, error.retryable) == ("output_url_refused", False)
    assert error.message.startswith("the image URL is refused: ")
    assert foreign.requests == [], "nothing was sent"


# ---------------------------------------------------------------- size, time, encoding


@SIDES
@pytest.mark.parametrize(
    "answer",
    [declared(10**12), declared(CAP + 1), chunked()],
    ids=["declared-a-terabyte", "declared-one-byte-over", "chunked-endless"],
)
def test_an_image_over_the_cap_is_refused(
    upstream: Origin, foreign: Origin, make_client: MakeClient, side: str, answer: Answer
) -> None:
    url = serving(side, upstream, foreign, "/big.png", answer)
    error = failure(lambda: make_client().download(url))
    assert (error.code, error.retryable) == ("output_too_large", False)
    assert error.message == f"the image at the URL is larger than {CAP} bytes"


@SIDES
@pytest.mark.parametrize(
    "answer", [body(b"\x89PNG" + b"\0" * (CAP - 4)), chunked(b"\x89PNG" + b"\0" * (CAP // 4 - 4), count=4)]
)
def test_an_image_of_the_cap_is_fetched(
    upstream: Origin, foreign: Origin, make_client: MakeClient, side: str, answer: Answer
) -> None:
    url = serving(side, upstream, foreign, "/cap.png", answer)
    assert len(make_client().download(url)) == CAP


@SIDES
def test_a_trickling_image_is_cut_off_at_the_download_deadline(
    upstream: Origin, foreign: Origin, make_client: MakeClient, side: str
) -> None:
    """A byte every 50 ms never trips a per-read timeout; IMAGE_DOWNLOAD_TIMEOUT (1 s) ends the whole."""
    url = serving(side, upstream, foreign, "/slow.png", trickle(10_000, 0.05))
    client = make_client()
    began = time.monotonic()
    error = failure(lambda: client.download(url))
    took = time.monotonic() - began
    assert (error.code, error.retryable) == ("upstream_timeout", True)
    assert error.message == "the image URL did not answer in time (ReadTimeout)"
    assert 0.9 <= took < 2.5, took


@SIDES
def test_a_compressed_image_is_refused_never_decompressed(
    upstream: Origin, foreign: Origin, make_client: MakeClient, side: str
) -> None:
    bomb = gzip.compress(b"\0" * (CAP * 100))  # 6.4 MiB behind about 6 KiB
    url = serving(side, upstream, foreign, "/gz.png", body(bomb, headers={"Content-Encoding": "gzip"}))
    error = failure(lambda: make_client().download(url))
    assert (error.code, error.retryable) == ("output_download_failed", False)
    assert error.message == "the image URL answered compressed (Content-Encoding), which is refused"


@SIDES
@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (404, "output_download_failed", False),
        (403, "output_download_failed", False),
        (302, "output_download_failed", False),
        (429, "upstream_unavailable", True),
        (503, "upstream_unavailable", True),
    ],
)
def test_an_image_urls_error_is_reported_by_its_status_never_its_body(
    upstream: Origin,
    foreign: Origin,
    make_client: MakeClient,
    side: str,
    status: int,
    code: str,
    retryable: bool,
) -> None:
    page = f'<html>{SECRET} {{"error": {{"message": "{SECRET}"}}}}</html>'.encode()
    answer = body(page, status=status, headers={"Location": foreign.url("/elsewhere.png")})
    error = failure(lambda: make_client().download(serving(side, upstream, foreign, "/e.png", answer)))
    assert (error.code, error.retryable, error.upstream_status) == (code, retryable, status)
    assert error.message == f"the image URL answered HTTP {status}"
    assert foreign.at("/elsewhere.png") == [], "a redirect is never followed"


def test_transport_errors_name_their_type_never_the_address(make_client: MakeClient) -> None:
    closed = free_port()  # nothing listens there
    client = make_client(upstream_base_url=f"http://127.0.0.1:{closed}")
    error = failure(lambda: client.generate(b"{}"))
    assert (error.code, error.retryable) == ("upstream_unavailable", True)
    assert error.message == "the upstream could not be reached (ConnectError)"
    assert isinstance(error.__cause__, httpx.ConnectError), "the detail stays in the chain, for the logs"
    error = failure(lambda: make_client().download(f"http://127.0.0.1:{closed}/img.png"))
    assert error.message == "the image URL could not be reached (ConnectError)"


# ---------------------------------------------------------------- the upstream's own answer


@pytest.mark.parametrize(
    "answer",
    [
        declared(10**12),
        declared(CAP + 1),
        chunked(),
        body(gzip.compress(b" " * (CAP * 100)), headers={"Content-Encoding": "gzip"}),
    ],
    ids=["declared-a-terabyte", "declared-one-byte-over", "chunked-endless", "gzip-bomb"],
)
def test_an_upstream_answer_over_the_cap_is_refused(
    upstream: Origin, make_client: MakeClient, answer: Answer
) -> None:
    upstream.answer(GENERATIONS_PATH, answer)
    error = failure(lambda: make_client().generate(b"{}"))
    assert (error.code, error.retryable) == ("upstream_response_too_large", False)
    assert error.message == f"the upstream's answer is larger than {CAP} bytes (MAX_UPSTREAM_RESPONSE_BYTES)"
    [request] = upstream.at(GENERATIONS_PATH)
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize(
    "answer",
    [
        body(b"{" * CAP),
        chunked(b"{" * (CAP // 4), count=4),
        body(gzip.compress(b"{" * CAP), headers={"Content-Encoding": "gzip"}),
    ],
    ids=["declared", "chunked", "gzip"],
)
def test_an_upstream_answer_of_the_cap_is_read(
    upstream: Origin, make_client: MakeClient, answer: Answer
) -> None:
    upstream.answer(GENERATIONS_PATH, answer)
    status, content = make_client().generate(b"{}")
    assert (status, bytes(content)) == (200, b"{" * CAP)


def test_an_upstream_answer_in_an_encoding_we_did_not_ask_for_is_refused(
    upstream: Origin, make_client: MakeClient
) -> None:
    upstream.answer(GENERATIONS_PATH, body(b"\x1b\x00\x00", headers={"Content-Encoding": "br"}))
    error = failure(lambda: make_client().generate(b"{}"))
    assert (error.code, error.retryable) == ("bad_upstream_response", False)


def test_the_upstreams_cookies_are_neither_kept_nor_sent_back(
    upstream: Origin, make_client: MakeClient
) -> None:
    """The upstream is an API: a cookie it sets is not read (that cost CPU per call), nor sent again."""
    upstream.answer(
        GENERATIONS_PATH,
        body(b'{"data": []}', headers={"Content-Type": "application/json", "Set-Cookie": "s=1"}),
    )
    client = make_client()
    for _ in range(2):
        assert client.generate(b"{}")[0] == 200
    assert [request.headers.get("cookie") for request in upstream.at(GENERATIONS_PATH)] == [None, None]
