"""One upstream, many workers: a global limit on upstream calls, shared by every process on every host.

- A semaphore of ``UPSTREAM_MAX_CONCURRENCY`` slots (0: no cap): a sorted set of holder tokens scored by
  when their hold expires. A holder renews its slot with its task's lease, so a killed worker's slot
  frees itself within ``TASK_LEASE_SECONDS``.
- A shared cooldown: when the upstream answers 429 with a ``retryDelay``, every worker waits it out, not
  just the one that was told.
- An optional token bucket of ``UPSTREAM_RATE_PER_MINUTE`` calls a minute (burst: one second's worth,
  at least one).

All three are checked and the slot taken in one script. A caller told to wait a short time waits in
its thread; told to wait longer, it gives its task back to be retried later (``Deferred``).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from services import clock
from services.errors import Deferred
from services.keys import Keys
from services.lua import REDIS_NOW_MS, Script
from services.redis_errors import mapped_redis_errors

# KEYS: slots, cooldown, bucket. ARGV: token, hold ms, max slots (0 = none), rate per minute (0 = none).
# Returns 0 when the slot was taken, else how many ms to wait before asking again. Every time here is on
# Redis's clock: a worker whose host's clock runs ahead must not see others' slots as expired.
_ACQUIRE = (
    REDIS_NOW_MS
    + """
local now = redis_now_ms()
local cooldown = tonumber(redis.call('GET', KEYS[2]) or '0')
if cooldown > now then return cooldown - now end
local max_slots = tonumber(ARGV[3])
if max_slots > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= max_slots then
    return -1
  end
end
local rate = tonumber(ARGV[4])
if rate > 0 then
  local capacity = math.max(1, rate / 60)
  local state = redis.call('HMGET', KEYS[3], 'tokens', 'at')
  local tokens = tonumber(state[1] or capacity)
  local at = tonumber(state[2] or now)
  tokens = math.min(capacity, tokens + (now - at) * rate / 60000)
  if tokens < 1 then
    redis.call('HSET', KEYS[3], 'tokens', tokens, 'at', now)
    return math.ceil((1 - tokens) * 60000 / rate)
  end
  redis.call('HSET', KEYS[3], 'tokens', tokens - 1, 'at', now)
end
if max_slots > 0 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) end
return 0
"""
)

# KEYS: slots. ARGV: how long a slot lasts now (ms), then holders' tokens. Returns, per token, 1 if it still
# held a slot (now extended), else 0: a worker renews all its slots in one call.
_RENEW_SLOTS = (
    REDIS_NOW_MS
    + """
local until_ms = redis_now_ms() + tonumber(ARGV[1])
local renewed = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], until_ms, ARGV[i])
    renewed[i - 1] = 1
  else
    renewed[i - 1] = 0
  end
end
return renewed
"""
)

# KEYS: cooldown. ARGV: how long from now (ms). Only ever moves the end of the cooldown later.
_COOL_DOWN = (
    REDIS_NOW_MS
    + """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local until_ms = redis_now_ms() + tonumber(ARGV[1])
if until_ms > current then
  redis.call('SET', KEYS[1], until_ms, 'PXAT', until_ms)
end
return 1
"""
)


@dataclass(frozen=True)
class LimiterSettings:
    max_concurrency: int
    rate_per_minute: float
    hold_seconds: float  # how long a slot lasts unless renewed (the task lease)
    max_wait_in_thread: float  # waits longer than this give the task back instead


class UpstreamLimiter:
    def __init__(self, client: redis.Redis, keys: Keys, settings: LimiterSettings) -> None:
        self._redis = client
        self._settings = settings
        self._slots = keys.limiter_slots
        self._cooldown = keys.limiter_cooldown
        self._bucket = keys.limiter_bucket
        self._acquire = Script(
            client,
            _ACQUIRE,
            keys=["slots", "cooldown", "bucket"],
            args=["token", "hold_ms", "max_slots", "rate_per_minute"],
        )
        self._cool_down = Script(client, _COOL_DOWN, keys=["cooldown"], args=["for_ms"])
        self._renew_slots = Script(client, _RENEW_SLOTS, keys=["slots"], args=["hold_ms"], more_args="tokens")
        self._polling = threading.Lock()  # held by the one thread of the process polling for a slot

    def renew(self, token: str) -> bool:
        """Extend the slot ``token`` holds; False when it was lost (expired and maybe taken)."""
        return self.renew_slots([token])[0]

    def renew_slots(self, tokens: Sequence[str]) -> list[bool]:
        """``renew`` for many slots in one round trip (the lease keeper's)."""
        if self._settings.max_concurrency <= 0:
            return [True] * len(tokens)
        hold_ms = clock.ms(self._settings.hold_seconds)
        with mapped_redis_errors():
            renewed = self._renew_slots(slots=self._slots, hold_ms=hold_ms, tokens=list(tokens))
        return [result == 1 for result in renewed]

    def release(self, token: str) -> None:
        if self._settings.max_concurrency > 0:
            with mapped_redis_errors():
                self._redis.zrem(self._slots, token)

    def cool_down(self, seconds: float) -> None:
        """Make every worker wait ``seconds`` before its next call (a 429's retryDelay)."""
        with mapped_redis_errors():
            self._cool_down(cooldown=self._cooldown, for_ms=clock.ms(seconds))

    def acquire(self, token: str) -> None:
        """Take one upstream slot for ``token``: wait briefly in this thread, or raise ``Deferred``.

        While every slot is busy, one thread of the process polls for one at a time, and the process's
        other waiters queue behind it on a lock, which costs them nothing: a worker of 2,000 threads
        polling together would spend its CPU, and starve its lease keeper, on asking (bench/README.md,
        P6)."""
        deadline = time.monotonic() + self._settings.max_wait_in_thread
        if self._take(token) == 0:
            return
        if not self._polling.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Deferred(0.05)
        try:
            self._poll(token, deadline)
        finally:
            self._polling.release()

    def _poll(self, token: str, deadline: float) -> None:
        pause = 0.01
        while (wait_ms := self._take(token)) != 0:
            if wait_ms > 0:  # a cooldown or the bucket: we know how long
                wait = wait_ms / 1000
            else:  # all slots busy: poll, backing off a little, with jitter against herds
                pause = min(pause * 1.5, 0.1)
                wait = random.uniform(pause / 2, pause)
            if time.monotonic() + wait > deadline:
                raise Deferred(max(wait, 0.05))
            time.sleep(wait)

    def _take(self, token: str) -> int:
        """Try to take a slot: 0 when taken, else how many ms to wait (a cooldown, the bucket), or -1
        when every slot is busy."""
        settings = self._settings
        with mapped_redis_errors():
            return int(
                self._acquire(
                    slots=self._slots,
                    cooldown=self._cooldown,
                    bucket=self._bucket,
                    token=token,
                    hold_ms=clock.ms(settings.hold_seconds),
                    max_slots=settings.max_concurrency,
                    rate_per_minute=settings.rate_per_minute,
                )
            )
