"""Which worker processes are consuming now: each one announces itself while it consumes.

A worker's consumer, once its queues are being consumed, writes ``{p}:worker:{host}:{pid}`` (its node
name, queues, slots and prefetch multiplier, JSON) with a short TTL and renews it, and in
``{p}:capacity`` the messages it takes at once: its slots times its prefetch multiplier (each slot's
running job, and with ``WORKER_PREFETCH_MULTIPLIER=2`` a successor reserved behind it); it deletes both
when it stops. A process that dies
disappears when the TTL runs out. Operators (and the fault tests, which must not submit before every
worker consumes) read ``consuming()``; the ``host:pid`` is the prefix of the ``worker`` recorded on every
attempt it runs.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import redis

from services import clock
from services.errors import StoreUnavailable
from services.keys import Keys
from services.periodic import Periodic
from services.redis_errors import mapped_redis_errors
from services.serialization import dumps

HEARTBEAT_SECONDS = 5.0


def process_name() -> str:
    """This process as attempts record it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Presence:
    """One worker process's announcement, renewed every ``HEARTBEAT_SECONDS`` until withdrawn; with
    ``slots`` (the jobs it runs at once, if it consumes generation jobs), its part of the workers'
    capacity, which bounds admission's window (``services/admission.py``): ``slots × prefetch``, the
    messages its consumer reserves. Announcing the slots alone would keep a prefetch above 1 from ever
    holding a successor: admission would never hand the broker more than the running jobs. A prefetch of
    0 (Celery's "no limit") announces the slots alone, not nothing."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        node: str,
        queues: list[str],
        slots: int = 0,
        prefetch: int = 1,
    ) -> None:
        self._redis = client
        self._key = keys.worker(process_name())
        self._capacity = keys.capacity
        self._slots = f"{process_name()}={slots * max(prefetch, 1)}" if slots > 0 else None
        self._info = dumps(
            {
                "node": node,
                "queues": sorted(queues),
                "process": process_name(),
                "slots": slots,
                "prefetch": prefetch,
            }
        )
        self._periodic = Periodic("presence", HEARTBEAT_SECONDS, self._announce)

    def _announce(self) -> bool:
        ttl = 3 * HEARTBEAT_SECONDS
        with mapped_redis_errors():
            if self._slots is not None:
                # Redis's clock, not this host's: one whose clock is behind would not be counted, one
                # whose clock is ahead would remove every other worker's capacity as if it had died
                now = clock.redis_ms(self._redis.time())
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self._key, self._info, ex=round(ttl))
            if self._slots is not None:
                pipe.zadd(self._capacity, {self._slots: now + clock.ms(ttl)})
                pipe.zremrangebyscore(self._capacity, "-inf", now)  # processes that died
            pipe.execute()
        return False

    def start(self) -> None:
        self._announce()
        self._periodic.start()

    def stop(self) -> None:
        """Withdraw the announcement; if Redis cannot be reached, it expires on its own."""
        self._periodic.stop()
        try:
            with mapped_redis_errors():
                self._redis.delete(self._key)
                if self._slots is not None:
                    self._redis.zrem(self._capacity, self._slots)
        except StoreUnavailable:
            pass


def consuming(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The worker processes that announced themselves and have not stopped or died."""
    with mapped_redis_errors():
        names = list(client.scan_iter(match=keys.workers_pattern(), count=500))
        values = client.mget(names) if names else []
    return [json.loads(value) for value in values if value is not None]
