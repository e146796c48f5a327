"""Where webhooks may go: never to this host, its network or a cloud's metadata service.

A webhook URL is the client's choice, so without a guard it is a way into our own network (SSRF). The
rules, checked on every address a host name resolves to (all of them must pass):

- refused: loopback, private (RFC 1918, unique-local), link-local, shared (CGNAT), reserved, multicast,
  unspecified and documentation ranges, i.e. everything that is not globally routable, including the
  same ranges wrapped in IPv6 (``::ffff:127.0.0.1``, 6to4, NAT64);
- refused always, even with ``WEBHOOK_ALLOW_PRIVATE=true``: the metadata services of the clouds
  (169.254.169.254, fd00:ec2::254, 100.100.100.200);
- ``WEBHOOK_ALLOW_PRIVATE=true`` lifts the first rule (local development and tests; unsafe in
  production).

The check is made where the connection is made: ``GuardedBackend`` resolves the host itself, checks the
addresses, and connects to the address it checked, so a name whose DNS answer changes between a check
and the connection (DNS rebinding) cannot slip through. The URL is not rewritten, so the ``Host`` header
and TLS's SNI and certificate check still use the name. Redirects are never followed (the caller's
``follow_redirects=False``) and no proxy from the environment is used.

httpx's timeouts bound each socket operation, not a request: a receiver that trickles its answer a byte
at a time could hold a worker thread for days. ``deadline()`` bounds the whole request: every connect,
read and write made inside it times out when the deadline has passed.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from services.errors import AddressNotAllowed, InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list[tuple[Any, ...]]]

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(address) for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def forbidden_reason(address: IPAddress, *, allow_private: bool = False) -> str | None:
    """Why we must not connect to ``address`` (``"loopback"``, ``"metadata service"``, ...), or None."""
    for candidate in _unwrapped(address):
        if candidate in METADATA_ADDRESSES:
            return "metadata service"
    if allow_private:
        return None
    for candidate in _unwrapped(address):
        for reason, flagged in (
            ("unspecified", candidate.is_unspecified),
            ("loopback", candidate.is_loopback),
            ("link-local", candidate.is_link_local),
            ("multicast", candidate.is_multicast),
            ("private", candidate.is_private),
            ("reserved", candidate.is_reserved),
            ("not globally routable", not candidate.is_global),
        ):
            if flagged:
                return reason
    return None


def _unwrapped(address: IPAddress) -> list[IPAddress]:
    """The address and any IPv4 address it carries (mapped, 6to4, NAT64)."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address in _NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.scope_id:
            found.append(ipaddress.IPv6Address(str(address).split("%")[0]))
    return found


def check_address(address: str, *, allow_private: bool) -> IPAddress:
    ip = ipaddress.ip_address(address)
    reason = forbidden_reason(ip, allow_private=allow_private)
    if reason is not None:
        raise AddressNotAllowed(f"refused to connect to {ip} ({reason})", reason=reason)
    return ip


def resolve_checked(
    host: str, port: int, *, allow_private: bool, resolver: Resolver = socket.getaddrinfo
) -> list[str]:
    """The addresses of ``host``, each one checked; ``AddressNotAllowed`` if any is refused."""
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        try:
            check_address(address, allow_private=allow_private)
        except AddressNotAllowed as exc:
            raise AddressNotAllowed(
                f"{host} resolves to {address}: {exc.message}", reason=exc.reason
            ) from None
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise httpcore.ConnectError(f"{host!r} has no address")
    return addresses


def check_webhook_url(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """What can be refused at submit without DNS: the scheme, and a literal address or ``localhost``."""
    parts = urlsplit(url)
    if parts.scheme != "https" and not allow_http:
        raise InvalidRequest(
            "webhook_url must be https:// (plain http is allowed only with WEBHOOK_ALLOW_HTTP=true).",
            field="webhook_url",
        )
    host = (parts.hostname or "").rstrip(".").lower()
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        reason = forbidden_reason(literal, allow_private=allow_private)
    elif (host == "localhost" or host.endswith(".localhost")) and not allow_private:
        reason = "loopback"
    else:
        reason = None
    if reason is not None:
        raise InvalidRequest(
            f"webhook_url must not point at a {reason} address ({host}).", field="webhook_url"
        )


_deadline = threading.local()


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Every connection step this thread makes inside the block ends by ``seconds`` from now."""
    _deadline.at = time.monotonic() + seconds
    try:
        yield
    finally:
        _deadline.at = None


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    at: float | None = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        timeout = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's network backend, connecting only to addresses it resolved and checked itself."""

    def __init__(self, *, allow_private: bool, resolver: Resolver = socket.getaddrinfo) -> None:
        self._allow_private = allow_private
        self._resolver = resolver

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = resolve_checked(host, port, allow_private=self._allow_private, resolver=self._resolver)
        error: Exception | None = None
        for address in addresses:
            try:
                stream = super().connect_tcp(
                    address, port, _bounded(timeout, httpcore.ConnectTimeout), local_address, socket_options
                )
                return _DeadlineStream(stream)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise AddressNotAllowed("webhooks are not delivered to unix sockets", reason="unix socket")


def guarded_transport(
    *, allow_private: bool, limits: httpx.Limits, resolver: Resolver = socket.getaddrinfo
) -> httpx.HTTPTransport:
    """An httpx transport whose every connection goes through ``GuardedBackend`` (no proxy)."""
    transport = httpx.HTTPTransport(limits=limits, trust_env=False)
    # httpx has no public hook for the network backend: replace its (proxy-less) connection pool with
    # one built the same way plus our backend.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardedBackend(allow_private=allow_private, resolver=resolver),
    )
    return transport
