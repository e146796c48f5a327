"""Time as the service records it: epoch milliseconds in Redis scores, ISO-8601 UTC text in records.

Every timestamp a client sees is ``2026-12-02T01:54:41.123Z`` (milliseconds, ``Z``); every due time or
deadline in a sorted set is whole epoch milliseconds. Nothing else in the project converts between them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    """Now, in whole epoch milliseconds."""
    return round(time.time() * 1000)


def redis_ms(time_reply: tuple[int, int]) -> int:
    """Redis's own clock in epoch ms, from its ``TIME`` reply (seconds, microseconds): where every process
    must agree on now (lease deadlines, workers' capacity), whatever its host's clock says."""
    seconds, microseconds = time_reply
    return seconds * 1000 + microseconds // 1000


def ms(seconds: float) -> int:
    """A duration in whole milliseconds, at least 1 (Redis refuses a TTL of 0)."""
    return max(1, round(seconds * 1000))


def iso(epoch: float) -> str:
    """``epoch`` seconds as ISO-8601 UTC text with milliseconds."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_from_ms(epoch_ms: int) -> str:
    return iso(epoch_ms / 1000)


def now_iso() -> str:
    return iso(time.time())


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def epoch_ms(value: str) -> int:
    """ISO-8601 text as whole epoch milliseconds."""
    return round(parse_iso(value).timestamp() * 1000)


def day(epoch: float | None = None) -> str:
    """The UTC date of ``epoch`` (default: now) as ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC).strftime("%Y-%m-%d")
