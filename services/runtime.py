"""The clients one process needs, built once from the configuration.

The API and the worker each build one ``Runtime`` at start-up; nothing is created at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass, field

import redis

from services.config import Config
from services.idempotency import IdempotencyStore
from services.jobs import JobRunner
from services.leases import LeaseKeeper
from services.limits import LimiterSettings, UpstreamLimiter
from services.storage import Storage
from services.store import JobStore
from services.upstream_client import UpstreamClient
from services.webhooks import WebhookService

# glibc's mallopt parameters: allocations from M_MMAP_THRESHOLD up are mapped, and unmapped when freed;
# free memory at the top of a heap is given back once it exceeds M_TRIM_THRESHOLD
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
BIG_BUFFER_BYTES = 4 * 1024 * 1024
HEAP_SLACK_BYTES = 16 * 1024 * 1024


def keep_big_buffers_out_of_the_heap(
    threshold: int = BIG_BUFFER_BYTES, slack: int = HEAP_SLACK_BYTES
) -> bool:
    """Make glibc map every allocation of ``threshold`` bytes or more, and give it back when freed.

    By default glibc raises that threshold each time such a buffer is freed (up to 32 MB), after which
    big answers and images (a 4K image is 13 MB of base64, 10 MB decoded) are carved from per-thread
    heaps and stay there as RSS, fragmented: a worker with 4K images in flight grew by far more than the
    images themselves (see bench/README.md, P1–P5: fix 6, measured by P4). The threshold sits above a 1K
    answer (2 MB of base64, 1.5 MB decoded), whose buffers are reused from the heap: mapping them too
    cost the worker CPU on every job in page faults (fix 8). Fixing the threshold also fixes the trim
    threshold at glibc's 128 KB, which would hand those buffers back after every job; ``slack`` keeps
    that much free heap instead. A ``MALLOC_MMAP_THRESHOLD_`` in the environment wins; other C
    libraries are left alone. Returns whether the setting was made.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold) and libc.mallopt(_M_TRIM_THRESHOLD, slack))
    except (OSError, AttributeError):
        return False


def redis_client(config: Config) -> redis.Redis:
    return redis.Redis.from_url(
        config.redis_url,
        socket_timeout=config.store_timeout,
        socket_connect_timeout=config.store_timeout,
        health_check_interval=30,
        max_connections=max(64, config.worker_concurrency * 4),
    )


@dataclass
class Runtime:
    config: Config
    redis: redis.Redis = field(init=False)
    store: JobStore = field(init=False)
    storage: Storage = field(init=False)

    def __post_init__(self) -> None:
        keep_big_buffers_out_of_the_heap()
        self.redis = redis_client(self.config)
        self.store = JobStore(self.redis, self.config.key_prefix)
        self.storage = Storage(self.config, max_pool_connections=max(10, self.config.worker_concurrency))

    @functools.cached_property
    def idempotency(self) -> IdempotencyStore:
        return IdempotencyStore(self.redis, self.config.key_prefix, self.config.idempotency_ttl)

    @functools.cached_property
    def upstream(self) -> UpstreamClient:
        return UpstreamClient(self.config)

    @functools.cached_property
    def limiter(self) -> UpstreamLimiter:
        config = self.config
        settings = LimiterSettings(
            max_concurrency=config.upstream_max_concurrency,
            rate_per_minute=config.upstream_rate_per_minute,
            hold_seconds=config.task_lease_seconds,
            max_wait_in_thread=60.0,
        )
        return UpstreamLimiter(self.redis, config.key_prefix, settings)

    @functools.cached_property
    def keeper(self) -> LeaseKeeper:
        return LeaseKeeper(interval=self.config.task_lease_seconds / 3)

    @functools.cached_property
    def runner(self) -> JobRunner:
        return JobRunner(self.config, self.store, self.storage, self.upstream, self.limiter, self.keeper)

    @functools.cached_property
    def webhooks(self) -> WebhookService:
        return WebhookService(self.config, self.store, self.storage, self.redis)
