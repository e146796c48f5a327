"""The clients one process needs, built once from the configuration.

The API and each worker process build one ``Runtime`` at start-up (``api/app.py``, ``worker/steps.py``);
nothing is created at import time, and what only workers use is built on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from services.admission import Admission, window_setting
from services.batches import Batches
from services.broker import Broker, broker_for
from services.cancellation import CancelSignal, InFlightCalls
from services.config import Config
from services.idempotency import IdempotencyStore
from services.jobs import JobRunner
from services.keys import Keys
from services.leases import LeaseKeeper
from services.limits import LimiterSettings, UpstreamLimiter
from services.metrics import QueueCollector
from services.redis_connection import redis_client, scrape_client
from services.replication import ReplicaAck
from services.storage import Storage
from services.store import JobStore
from services.submission import SubmissionService
from services.task_events import TaskEvents
from services.task_list import TaskList
from services.tenants import Tenants, TenantSettings
from services.upstream_client import UpstreamClient
from services.usage import Usage
from services.webhooks.service import WebhookService
from services.work_gate import WorkGate


@dataclass
class Runtime:
    config: Config
    redis: redis.Redis = field(init=False)
    keys: Keys = field(init=False)
    store: JobStore = field(init=False)
    storage: Storage = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.redis = redis_client(config)
        self.store = JobStore(
            self.redis,
            config.key_prefix,
            task_retention=config.task_retention_days * 86400,
            tenant_defaults=self.tenant_defaults,
            admission_window=window_setting(config.upstream_max_concurrency),
            replica_ack=self.replica_ack,
        )
        self.keys = self.store.keys
        self.storage = Storage(self.config, max_pool_connections=max(10, self.config.worker_concurrency))

    @property
    def replica_ack(self) -> ReplicaAck:
        """How many replicas must hold a new task before its 202 (``REDIS_MIN_REPLICAS_ACK``)."""
        return ReplicaAck(self.config.redis_min_replicas_ack, self.config.redis_replica_ack_timeout)

    @property
    def tenant_defaults(self) -> TenantSettings:
        """The limits of a tenant without settings of its own (the ``TENANT_*`` variables)."""
        config = self.config
        return TenantSettings(
            max_concurrency=config.tenant_max_concurrency,
            max_queued=config.tenant_max_queued,
            rate_per_minute=config.tenant_rate_per_minute,
            weight=config.tenant_weight,
        )

    @functools.cached_property
    def tenants(self) -> Tenants:
        return Tenants(self.redis, self.keys, defaults=self.tenant_defaults, static_keys=self.config.api_keys)

    @functools.cached_property
    def task_list(self) -> TaskList:
        return TaskList(self.redis, self.keys)

    @functools.cached_property
    def usage(self) -> Usage:
        return Usage(self.redis, self.keys)

    @functools.cached_property
    def admission(self) -> Admission:
        return Admission(
            self.redis,
            self.keys,
            self.enqueue,
            window=window_setting(self.config.upstream_max_concurrency),
            defaults=self.tenant_defaults,
        )

    @functools.cached_property
    def broker(self) -> Broker:
        """The Celery broker: the store's Redis, or RabbitMQ (``BROKER_URL``; ``services/broker.py``)."""
        return broker_for(self.config, self.redis, self.keys)

    def enqueue(self, task_ids: Sequence[str]) -> None:
        """Send generation jobs to the broker."""
        self.broker.send(task_ids)

    # the API ----------------------------------------------------------------------------------------
    @functools.cached_property
    def submissions(self) -> SubmissionService:
        idempotency = IdempotencyStore(
            self.redis, self.keys, self.config.idempotency_ttl, replica_ack=self.replica_ack
        )
        return SubmissionService(self.config, self.store, idempotency, self.webhooks, self.broker)

    @functools.cached_property
    def batches(self) -> Batches:
        return Batches(self.redis, self.keys, self.store, self.webhooks.outbox)

    @functools.cached_property
    def task_events(self) -> TaskEvents:
        """The process's one subscription to task events, for the requests that wait (started lazily)."""
        return TaskEvents(self.redis, self.keys, self.store)

    @functools.cached_property
    def queue_metrics(self) -> QueueCollector:
        """The queues' depths for ``GET /metrics``, read with a client of its own whose short timeout
        keeps a scrape from hanging on a Redis that is down."""
        return QueueCollector(
            scrape_client(self.config),
            self.keys,
            max_concurrency=self.config.upstream_max_concurrency,
            broker_depths=self.broker.depths,
        )

    @functools.cached_property
    def webhooks(self) -> WebhookService:
        return WebhookService(self.config, self.storage, self.redis, self.keys)

    # workers ----------------------------------------------------------------------------------------
    @functools.cached_property
    def calls(self) -> InFlightCalls:
        return InFlightCalls()

    @functools.cached_property
    def cancel_signal(self) -> CancelSignal:
        return CancelSignal(self.redis, self.keys)

    @functools.cached_property
    def upstream(self) -> UpstreamClient:
        return UpstreamClient(self.config, calls=self.calls)

    @functools.cached_property
    def limiter(self) -> UpstreamLimiter:
        config = self.config
        settings = LimiterSettings(
            max_concurrency=config.upstream_max_concurrency,
            rate_per_minute=config.upstream_rate_per_minute,
            hold_seconds=config.task_lease_seconds,
            max_wait_in_thread=config.limiter_max_wait,
        )
        return UpstreamLimiter(self.redis, self.keys, settings)

    @functools.cached_property
    def keeper(self) -> LeaseKeeper:
        return LeaseKeeper(interval=self.config.task_lease_seconds / 3)

    @functools.cached_property
    def runner(self) -> JobRunner:
        return JobRunner(
            self.config,
            self.store,
            self.storage,
            self.upstream,
            self.limiter,
            self.keeper,
            self.admission,
            self.usage,
            self.calls,
            WorkGate(self.config.worker_busy_threads),
        )
