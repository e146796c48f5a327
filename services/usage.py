"""A tenant's usage, counted per UTC day: what ``GET /v1/usage`` shows.

Each count is written where its event happens, in the same atomic step where there is one:
``submitted`` by the submission's script, ``succeeded``/``failed``/``canceled``, ``images`` and
``bytes_stored`` by the store's change that makes a task final (``services/store.py``), and
``upstream_calls`` by the job runner after each call it makes. Kept ``RETENTION_SECONDS``.
"""

from __future__ import annotations

import time
from typing import cast

import redis

from services import clock
from services.keys import Keys
from services.redis_errors import mapped_redis_errors

FIELDS = ("submitted", "succeeded", "failed", "canceled", "upstream_calls", "images", "bytes_stored")
RETENTION_SECONDS = 400 * 86400
MAX_DAYS = 400


class Usage:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    def count(self, tenant: str, field: str, amount: int = 1) -> None:
        key = self._keys.tenant_usage(tenant, clock.day())
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hincrby(key, field, amount)
            pipe.expire(key, RETENTION_SECONDS)
            pipe.execute()

    def daily(self, tenant: str, days: int) -> list[dict[str, int | str]]:
        """The last ``days`` UTC days, newest first; days without any count are left out."""
        now = time.time()
        dates = [clock.day(now - 86400 * back) for back in range(min(days, MAX_DAYS))]
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for date in dates:
                pipe.hgetall(self._keys.tenant_usage(tenant, date))
            found = cast("list[dict[bytes, bytes]]", pipe.execute())
        rows: list[dict[str, int | str]] = []
        for date, counts in zip(dates, found, strict=True):
            if counts:
                values = {name.decode(): int(value) for name, value in counts.items()}
                rows.append({"date": date, **{name: values.get(name, 0) for name in FIELDS}})
        return rows
