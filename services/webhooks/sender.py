"""One webhook delivery attempt: sign the body, POST it through the address guard, read the answer.

An attempt's ``error`` goes into the delivery log that clients read (``GET /v1/tasks/{id}``), so it is a
fixed phrase and the error's class (``connection failed (ConnectError)``, ``refused: the receiver's
address is not allowed (private)``), never the library's text or the address the guard refused, which
name hosts and addresses on our side of the network: those are logged here.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from services.config import Config
from services.errors import AddressNotAllowed
from services.netguard import Resolver, deadline, guarded_transport
from services.retry_after import parse_retry_after
from services.webhook_signing import signed_headers

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024  # what we read of a receiver's answer (for keep-alive), at most
USER_AGENT = "imagegen-queue-webhooks/1"


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: int
    retry_after: float | None = None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookSender:
    """Signs and POSTs one webhook request through the address guard."""

    def __init__(self, config: Config, *, resolver: Resolver = socket.getaddrinfo) -> None:
        self._config = config
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=30)
        transport = guarded_transport(
            allow_private=config.webhook_allow_private, limits=limits, resolver=resolver
        )
        self._client = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(config.webhook_timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": USER_AGENT},
        )

    def close(self) -> None:
        self._client.close()

    def send(self, url: str, msg_id: str, body: bytes, secrets: Sequence[str]) -> AttemptResult:
        """POST ``body`` to ``url``, signed with each of ``secrets``."""
        started = time.monotonic()
        if urlsplit(url).scheme != "https" and not self._config.webhook_allow_http:
            return AttemptResult(None, "refused: plain http (WEBHOOK_ALLOW_HTTP is not set)", 0, refused=True)
        headers = {"content-type": "application/json", **signed_headers(secrets, msg_id, body)}
        try:
            # connect, then the answer: each within WEBHOOK_TIMEOUT, and the whole within twice that
            with deadline(2 * self._config.webhook_timeout):
                with self._client.stream("POST", url, content=body, headers=headers) as response:
                    read = 0
                    for chunk in response.iter_raw():
                        read += len(chunk)
                        if read > MAX_ANSWER_BYTES:
                            break
                    status = response.status_code
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
        except AddressNotAllowed as exc:
            log.warning("webhook %s refused: %s", msg_id, exc.message)
            return AttemptResult(
                None,
                f"refused: the receiver's address is not allowed ({exc.reason})",
                _since(started),
                refused=True,
            )
        except httpx.TimeoutException as exc:
            return AttemptResult(None, f"timeout: {type(exc).__name__}", _since(started))
        except httpx.HTTPError as exc:
            log.warning("webhook %s: %s: %s", msg_id, type(exc).__name__, exc)
            failed = "connection failed" if isinstance(exc, httpx.NetworkError) else "request failed"
            return AttemptResult(None, f"{failed} ({type(exc).__name__})", _since(started))
        error = "redirect not followed" if 300 <= status < 400 else None
        return AttemptResult(status, error, _since(started), retry_after)


def _since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
