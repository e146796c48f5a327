"""``Retry-After`` (RFC 9110): seconds to wait, from delay-seconds or an HTTP-date.

One parser for both sides that read it: the upstream's 429s and 503s, and webhook receivers.
"""

from __future__ import annotations

import re
import time
from datetime import UTC
from email.utils import parsedate_to_datetime

_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` value (a date in the past gives 0); None when it is neither form.

    Delay-seconds are whole in the RFC; a decimal (``1.5``) is accepted too, as some servers send it.
    """
    value = (value or "").strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())
