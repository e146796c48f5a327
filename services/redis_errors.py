"""Redis's errors, mapped to ours at the boundary: every call to Redis runs inside ``mapped_redis_errors``.

A ``StoreUnavailable`` says what failed in fixed words that clients may see (the API's 503, the admin's
``/readyz``); redis-py's own text, which names the host and port, goes to the log and the exception chain.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from services.errors import StoreUnavailable

log = logging.getLogger(__name__)

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
        log.warning("the task store is unavailable: %s: %s", type(exc).__name__, exc)
        raise StoreUnavailable(f"the task store is unavailable ({type(exc).__name__})") from exc
    except redis.ResponseError as exc:
        reply = next((word for word in _UNAVAILABLE_REPLIES if word in str(exc)), None)
        if reply is None:
            raise
        log.warning("the task store refused a call: %s", exc)
        raise StoreUnavailable(f"the task store cannot serve requests now ({reply})") from exc
