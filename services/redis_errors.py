"""Redis's errors, mapped to ours at the boundary: every call to Redis runs inside ``mapped_redis_errors``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from services.errors import StoreUnavailable

# Redis answers these when it cannot serve a call now (disk full, out of memory, loading its AOF, a
# replica, a script running too long, no master): the store is unavailable, not the request wrong.
_UNAVAILABLE_REPLIES = (
    "MISCONF",
    "OOM",
    "LOADING",
    "READONLY",
    "BUSY",
    "MASTERDOWN",
    "NOREPLICAS",
    "TRYAGAIN",
)


@contextmanager
def mapped_redis_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.InvalidResponse) as exc:
        raise StoreUnavailable(f"the task store (Redis) is unavailable: {exc}") from exc
    except redis.ResponseError as exc:
        if any(word in str(exc) for word in _UNAVAILABLE_REPLIES):
            raise StoreUnavailable(f"the task store (Redis) refused the write: {exc}") from exc
        raise
