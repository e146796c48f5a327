"""Prometheus metrics: every metric the service exports is defined here, and recorded only through the
functions below, which never raise: a metric that cannot be recorded is logged and dropped, never the job.

Recorded where the event happens, in the process where it happens (README.md, "Metrics"):

  imagegen_tasks_submitted_total               counter    tasks accepted (202); a replayed Idempotency-Key
                                                          is not a new task (``submission``)
  imagegen_tasks_finished_total{status}        counter    tasks that became succeeded, failed or canceled
                                                          (``store``'s one writer, in a worker or the API)
  imagegen_task_duration_seconds               histogram  a finished task's time from submission to final
  imagegen_upstream_requests_total{outcome}    counter    upstream calls: ``ok``, or the UpstreamError's code
                                                          (UPSTREAM_OUTCOMES; anything else ``other``)
  imagegen_upstream_request_duration_seconds   histogram  one upstream call, request to the answer's last byte
  imagegen_upstream_in_flight                  gauge      upstream calls in flight in the process
  imagegen_storage_upload_duration_seconds     histogram  one successful upload to S3 (boto3's retries in it)
  imagegen_storage_upload_failures_total       counter    uploads that failed after boto3's retries
  imagegen_webhook_deliveries_total{outcome}   counter    delivery attempts: delivered, failed (retried),
                                                          given_up, gone (410), refused

Read from Redis when the API is scraped (``QueueCollector``), never stored: the same numbers from every
API process (take ``max`` across them); the workers' endpoints leave them out:

  imagegen_queue_depth{queue}                  gauge      generation, webhooks (the broker's messages not
                                                          delivered yet: Redis's lists; on RabbitMQ ready
                                                          messages, and for generation the outbox's
                                                          entries not published yet); ready
                                                          (waiting for admission, all tenants), admitted,
                                                          running, delayed (retries not due); webhook_events
                                                          (the outbox's pending events)
  imagegen_queue_oldest_age_seconds{queue}     gauge      ready: the oldest waiting task's age; generation:
                                                          the oldest sent message not started; delayed and
                                                          webhook_events: how overdue the most overdue is
  imagegen_upstream_slots_in_use               gauge      the limiter's slots held (UPSTREAM_MAX_CONCURRENCY)
  imagegen_upstream_max_concurrency            gauge      UPSTREAM_MAX_CONCURRENCY (0: no cap)
  imagegen_store_up                            gauge      1 if the scrape read Redis, 0 if it could not

No metric has a tenant label: tenants are made at run time (unbounded), and every label value is a series
in every process. Per-tenant numbers are in ``/v1/usage`` and ``/v1/admin/tenants``.

Several processes: under gunicorn the API runs in prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set up by ``gunicorn.conf.py``), and ``exposition`` adds up every process's
file. Each worker process serves its own registry on ``WORKER_METRICS_PORT`` (``serve``). Nothing is built
at import time: the metrics are made on first use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from services import clock
from services.errors import ServiceError
from services.keys import Keys
from services.queue import GENERATION_QUEUE, WEBHOOK_QUEUE

log = logging.getLogger(__name__)

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

TASK_STATUSES = ("succeeded", "failed", "canceled")
UPSTREAM_OUTCOMES = (
    "ok",
    "upstream_rejected",
    "upstream_auth",
    "upstream_not_found",
    "upstream_rate_limited",
    "upstream_quota_exhausted",
    "upstream_unavailable",
    "upstream_timeout",
    "upstream_response_too_large",
    "bad_upstream_response",
    "other",
)
WEBHOOK_OUTCOMES = ("delivered", "failed", "given_up", "gone", "refused")
QUEUES = ("generation", "webhooks", "ready", "admitted", "running", "delayed", "webhook_events")
BROKER_QUEUES = ("generation", "webhooks")  # the broker's own: on RabbitMQ, read from it (``broker_depths``)
AGED_QUEUES = ("ready", "generation", "delayed", "webhook_events")

# An upstream call takes seconds to minutes (UPSTREAM_TIMEOUT: 300 s); an upload, milliseconds to seconds.
UPSTREAM_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
UPLOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TASK_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

# A scrape reads Redis with this timeout and no retries: with Redis down or hung it answers in about this,
# with ``imagegen_store_up 0``, instead of holding the scrape (Prometheus's default timeout is 10 s).
SCRAPE_TIMEOUT = 1.0


@dataclass(frozen=True)
class _Instruments:
    submitted: Counter
    finished: Counter
    task_duration: Histogram
    upstream_requests: Counter
    upstream_duration: Histogram
    upstream_in_flight: Gauge
    upload_duration: Histogram
    upload_failures: Counter
    webhook_deliveries: Counter


_lock = threading.Lock()
_made: list[_Instruments] = []


def _instruments() -> _Instruments:
    """The process's metrics, made (and registered in prometheus_client's ``REGISTRY``) on first use, every
    known label value at 0 so that rates start from the first scrape. Without the ``*_created`` series,
    which would double the series for nothing PromQL uses."""
    with _lock:
        if not _made:
            disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
            made = _Instruments(
                submitted=Counter("imagegen_tasks_submitted_total", "Tasks accepted (202)"),
                finished=Counter(
                    "imagegen_tasks_finished_total", "Tasks that became final, by status", ["status"]
                ),
                task_duration=Histogram(
                    "imagegen_task_duration_seconds",
                    "Time from submission to a final status",
                    buckets=TASK_BUCKETS,
                ),
                upstream_requests=Counter(
                    "imagegen_upstream_requests_total", "Upstream calls, by outcome", ["outcome"]
                ),
                upstream_duration=Histogram(
                    "imagegen_upstream_request_duration_seconds",
                    "Duration of one upstream call, to the answer's last byte",
                    buckets=UPSTREAM_BUCKETS,
                ),
                upstream_in_flight=Gauge(
                    "imagegen_upstream_in_flight",
                    "Upstream calls in flight",
                    multiprocess_mode="livesum",
                ),
                upload_duration=Histogram(
                    "imagegen_storage_upload_duration_seconds",
                    "Duration of one successful upload to S3",
                    buckets=UPLOAD_BUCKETS,
                ),
                upload_failures=Counter(
                    "imagegen_storage_upload_failures_total",
                    "Uploads to S3 that failed after boto3's retries",
                ),
                webhook_deliveries=Counter(
                    "imagegen_webhook_deliveries_total", "Webhook delivery attempts, by outcome", ["outcome"]
                ),
            )
            for status in TASK_STATUSES:
                made.finished.labels(status)
            for outcome in UPSTREAM_OUTCOMES:
                made.upstream_requests.labels(outcome)
            for outcome in WEBHOOK_OUTCOMES:
                made.webhook_deliveries.labels(outcome)
            _made.append(made)
        return _made[0]


def _safely(record: Callable[[_Instruments], object]) -> None:
    """Record a metric; a failure is logged, never raised: a metric must not break the work it counts."""
    try:
        record(_instruments())
    except Exception:  # noqa: BLE001 - any failure of the metrics library stays here
        log.warning("a metric could not be recorded", exc_info=True)


# recording ----------------------------------------------------------------------------------------------
def task_submitted(count: int = 1) -> None:
    _safely(lambda m: m.submitted.inc(count))


def task_finished(status: str, *, created_at: str, finished_at: str | None) -> None:
    """A task became final (its timestamps as the record has them)."""

    def record(m: _Instruments) -> None:
        m.finished.labels(status if status in TASK_STATUSES else "failed").inc()
        if finished_at is not None:
            m.task_duration.observe(
                max(0.0, (clock.epoch_ms(finished_at) - clock.epoch_ms(created_at)) / 1000)
            )

    _safely(record)


def webhook_delivery(outcome: str) -> None:
    _safely(lambda m: m.webhook_deliveries.labels(outcome if outcome in WEBHOOK_OUTCOMES else "failed").inc())


@contextmanager
def upstream_request() -> Iterator[None]:
    """Around one upstream call: in flight meanwhile, then its duration and outcome (``ok``, or the
    ``ServiceError``'s code it raised)."""
    _safely(lambda m: m.upstream_in_flight.inc())
    started = time.monotonic()
    outcome = "ok"
    try:
        yield
    except ServiceError as exc:
        outcome = exc.code if exc.code in UPSTREAM_OUTCOMES else "other"
        raise
    except BaseException:
        outcome = "other"
        raise
    finally:
        seconds = time.monotonic() - started

        def record(m: _Instruments) -> None:
            m.upstream_in_flight.dec()
            m.upstream_requests.labels(outcome).inc()
            m.upstream_duration.observe(seconds)

        _safely(record)


@contextmanager
def storage_upload() -> Iterator[None]:
    """Around one upload: its duration if it succeeds, a failure otherwise."""
    started = time.monotonic()
    try:
        yield
    except BaseException:
        _safely(lambda m: m.upload_failures.inc())
        raise
    seconds = time.monotonic() - started
    _safely(lambda m: m.upload_duration.observe(seconds))


# exposition ---------------------------------------------------------------------------------------------
def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_DIR) or None


class _Forward(Collector):
    """What another registry collects (the process's own ``REGISTRY`` inside a scrape's registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


def scrape_registry(extra: Sequence[Collector] = ()) -> CollectorRegistry:
    """A registry of what this process reports: in multiprocess mode every process's files added up (as
    prometheus_client's documentation prescribes: a registry of its own, not ``REGISTRY``), else the
    process's own ``REGISTRY`` (with its ``process_*`` and ``python_*`` metrics); plus ``extra``."""
    _instruments()  # every metric of the process is listed, at 0 before its first event
    registry = CollectorRegistry()
    path = multiprocess_dir()
    if path is not None:
        MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    else:
        registry.register(_Forward(REGISTRY))
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(accept: str | None, extra: Sequence[Collector] = ()) -> tuple[bytes, str]:
    """The body and content type of ``GET /metrics``: the Prometheus text format, or OpenMetrics if the
    scraper's ``Accept`` asks for it (as prometheus_client's own endpoint does)."""
    encode, content_type = choose_encoder(accept or "")
    return encode(scrape_registry(extra)), content_type


def serve(port: int) -> WSGIServer:
    """Serve this process's metrics on ``port`` (all interfaces: Prometheus scrapes from elsewhere), in a
    daemon thread; ``shutdown()`` the server to stop. Raises ``OSError`` if the port cannot be bound."""
    server, _thread = start_http_server(port, registry=scrape_registry())
    return server


def process_exited(pid: int) -> None:
    """In multiprocess mode, drop a dead process's live gauges (``imagegen_upstream_in_flight``): gunicorn's
    ``child_exit`` hook, a prefork worker's child at its end."""
    path = multiprocess_dir()
    if path is not None:
        try:
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        except OSError:
            log.warning("metrics of process %d could not be marked dead", pid, exc_info=True)


# read from Redis at scrape time -------------------------------------------------------------------------
class QueueCollector(Collector):
    """The queues' depths and ages, the limiter's slots and the cap, read from Redis on every scrape in two
    round trips (the second only when tenants wait); without Redis, ``imagegen_store_up 0`` and nothing
    else from here."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        max_concurrency: int,
        broker_depths: Callable[[], dict[str, int] | None] = lambda: None,
    ) -> None:
        """``broker_depths``: the ``generation`` and ``webhooks`` depths when the broker is not the store's
        Redis (RabbitMQ: ``services/broker.py``); None reads the Redis lists (LLEN) in the same pipeline."""
        self._redis = client
        self._keys = keys
        self._max_concurrency = max_concurrency
        self._broker_depths = broker_depths

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("imagegen_store_up", "1 if this scrape could read Redis, else 0")
        cap = GaugeMetricFamily("imagegen_upstream_max_concurrency", "UPSTREAM_MAX_CONCURRENCY (0: no cap)")
        cap.add_metric([], self._max_concurrency)
        try:
            depths, ages, slots = self._read()
        except Exception as exc:  # noqa: BLE001 - a scrape reports the store down, never fails
            log.warning("metrics: the queues could not be read from Redis (%s)", type(exc).__name__)
            up.add_metric([], 0)
            return [up, cap]
        up.add_metric([], 1)
        depth = GaugeMetricFamily("imagegen_queue_depth", "Tasks or messages in each queue", labels=["queue"])
        try:
            depths.update(self._broker_depths() or {})
        except ServiceError as exc:  # RabbitMQ unreachable: its queues' depths are left out
            log.warning("metrics: the broker's queues could not be read (%s)", exc.message)
            for queue in BROKER_QUEUES:
                depths.pop(queue, None)
        for queue in QUEUES:
            if queue in depths:
                depth.add_metric([queue], depths[queue])
        age = GaugeMetricFamily(
            "imagegen_queue_oldest_age_seconds",
            "Age of the oldest waiting entry (delayed, webhook_events: how overdue)",
            labels=["queue"],
        )
        for queue in AGED_QUEUES:
            age.add_metric([queue], ages[queue])
        in_use = GaugeMetricFamily("imagegen_upstream_slots_in_use", "Upstream limiter slots held")
        in_use.add_metric([], slots)
        return [up, cap, depth, age, in_use]

    def _read(self) -> tuple[dict[str, int], dict[str, float], int]:
        keys = self._keys
        now = clock.now_ms()
        pipe = self._redis.pipeline(transaction=False)
        pipe.llen(GENERATION_QUEUE)
        pipe.llen(WEBHOOK_QUEUE)
        for key in (keys.admitted, keys.running, keys.delayed, keys.webhooks_due):
            pipe.zcard(key)
        for key in (keys.queued, keys.delayed, keys.webhooks_due):
            pipe.zrange(key, 0, 0, withscores=True)
        pipe.zcount(keys.limiter_slots, now, "+inf")
        pipe.smembers(keys.ready_tenants)
        (generation, webhooks, admitted, running, delayed, events, queued_head, delayed_head, events_head,
         slots, tenants) = pipe.execute()  # fmt: skip
        ready, ready_oldest = 0, None
        if tenants:
            pipe = self._redis.pipeline(transaction=False)
            for tenant in sorted(tenants):
                pipe.zcard(keys.tenant_ready(tenant.decode()))
                pipe.zrange(keys.tenant_ready(tenant.decode()), 0, 0, withscores=True)
            answers = pipe.execute()
            ready = sum(answers[0::2])
            heads = [score for score in map(_score, answers[1::2]) if score is not None]
            ready_oldest = min(heads, default=None)
        depths = {
            "generation": generation,
            "webhooks": webhooks,
            "ready": ready,
            "admitted": admitted,
            "running": running,
            "delayed": delayed,
            "webhook_events": events,
        }
        ages = {
            "ready": _age(now, ready_oldest),
            "generation": _age(now, _score(queued_head)),
            "delayed": _age(now, _score(delayed_head)),
            "webhook_events": _age(now, _score(events_head)),
        }
        return depths, ages, int(slots)


def _score(head: list[tuple[bytes, float]]) -> float | None:
    """The score of a ``ZRANGE key 0 0 WITHSCORES`` answer (None: the set is empty)."""
    return float(head[0][1]) if head else None


def _age(now_ms: int, score_ms: float | None) -> float:
    """Seconds since ``score_ms``, 0 if that is in the future or there is none."""
    return max(0.0, (now_ms - score_ms) / 1000) if score_ms is not None else 0.0
