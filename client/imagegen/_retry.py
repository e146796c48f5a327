"""When a request is sent again, and after how long."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

# Answers that mean "not now": the server refused before doing anything (429 rate_limited and
# tenant_queue_full, 503 store_unavailable), so any request may be sent again.
_RETRY_ALWAYS = frozenset({429, 503})
# A gateway in front of the server timed out or failed: the request may have been handled.
_RETRY_IF_IDEMPOTENT = frozenset({502, 504})


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_retries`` more tries of one call. A ``Retry-After`` is honoured up to ``max_wait``
    (a longer one ends the retries: the caller gets the error and its ``retry_after``); without one the
    delay doubles from ``base_delay`` up to ``max_delay``, with jitter."""

    max_retries: int = 4
    max_wait: float = 60.0
    base_delay: float = 0.5
    max_delay: float = 8.0

    def backoff(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2.0**attempt) * random.uniform(0.5, 1.0)

    def after_response(
        self, response: httpx.Response, attempt: int, *, idempotent: bool, retry_codes: frozenset[str]
    ) -> float | None:
        """Seconds to wait before sending again, or None to stop. ``retry_codes``: error codes worth
        another try on this call (a submission's ``idempotency_in_progress``)."""
        status = response.status_code
        retry = status in _RETRY_ALWAYS or (idempotent and status in _RETRY_IF_IDEMPOTENT)
        if not retry and status < 500 and retry_codes and status >= 400:
            retry = error_code(response) in retry_codes
        if not retry or attempt >= self.max_retries:
            return None
        hinted = retry_after_seconds(response.headers.get("Retry-After"))
        if hinted is None:
            return self.backoff(attempt)
        return hinted if hinted <= self.max_wait else None

    def after_error(self, error: httpx.RequestError, attempt: int, *, idempotent: bool) -> float | None:
        """After a connection error: only a call that is safe to repeat is tried again."""
        if not idempotent or not isinstance(error, httpx.TransportError) or attempt >= self.max_retries:
            return None
        return self.backoff(attempt)


@dataclass(frozen=True)
class PollPolicy:
    """How ``wait`` polls a server that cannot stream or hold a request: from ``initial`` seconds,
    growing by ``factor`` up to ``maximum``. ``hold`` is the ``Prefer: wait=N`` asked of a server that can."""

    initial: float = 0.25
    factor: float = 1.5
    maximum: float = 3.0
    hold: int = 30


def error_code(response: httpx.Response) -> str | None:
    """The ``error.code`` of an error answer, if it has the server's shape."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None
