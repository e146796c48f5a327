"""The worker's bootsteps: what a worker process builds and starts besides Celery's own parts.

- ``RuntimeStep`` builds the process's clients (``services.runtime.Runtime``), sized for the pool that
  really runs (``--concurrency`` wins over ``WORKER_CONCURRENCY``), keeps them on the Celery app,
  logs its memory allocator (tuning glibc's for big buffers: ``worker/memory.py``) and raises the
  open-files limit to what the pool needs (``worker/open_files.py``);
- ``ShutdownDeadlineStep`` makes a stopping worker exit within ``WORKER_SHUTDOWN_TIMEOUT``
  (``worker/shutdown.py``);
- ``SweeperStep`` runs the sweeper (``services/sweeper.py``) in every worker;
- ``CancelListenerStep`` cuts off the upstream calls of canceled tasks (``services/cancellation.py``) in
  generation workers;
- ``DispatcherStep`` runs the webhook dispatcher in workers that consume the ``webhooks`` queue;
- ``MetricsStep`` serves the process's metrics on ``WORKER_METRICS_PORT`` (``services/metrics.py``);
- ``PresenceStep`` (consumer) announces the process once its queues are consumed (``services/presence.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any
from wsgiref.simple_server import WSGIServer

from celery import Celery, bootsteps
from celery.signals import worker_process_shutdown, worker_shutting_down

from services import metrics
from services.cancellation import CancelListener
from services.presence import Presence
from services.queue import DELIVER_WEBHOOK_TASK, GENERATION_QUEUE, WEBHOOK_QUEUE
from services.runtime import Runtime
from services.sweeper import Sweeper
from services.webhooks.dispatcher import WebhookDispatcher
from worker.memory import allocator, keep_big_buffers_out_of_the_heap
from worker.open_files import raise_open_files_limit
from worker.shutdown import ShutdownDeadline

log = logging.getLogger(__name__)


def runtime_of(app: Celery) -> Runtime:
    """The process's clients, built by ``RuntimeStep`` before any task runs."""
    runtime: Runtime = app.conf.iq_runtime
    return runtime


class RuntimeStep(bootsteps.Step):  # type: ignore[misc]  # celery is untyped: its base classes are Any
    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        if allocator() == "jemalloc":
            log.info("memory allocator: jemalloc")
        else:
            keep_big_buffers_out_of_the_heap()
            log.info("memory allocator: glibc's malloc (preload jemalloc for a flat RSS: README.md, Memory)")
        config = worker.app.conf.iq_config
        config = dataclasses.replace(config, worker_concurrency=worker.concurrency)
        raise_open_files_limit(config.worker_concurrency)
        runtime = worker.app.conf.iq_runtime = Runtime(config)
        log.info("clients sized for a pool of %d", config.worker_concurrency)
        if runtime.storage.expire_outputs(config.output_retention):
            log.info(
                "outputs expire %d days after they are stored (the bucket's lifecycle)",
                config.output_retention,
            )


class ShutdownDeadlineStep(bootsteps.Step):  # type: ignore[misc]  # celery is untyped: its base classes are Any
    """Starts the ``WORKER_SHUTDOWN_TIMEOUT`` countdown when the worker is told to stop."""

    requires = (RuntimeStep,)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        deadline = ShutdownDeadline(runtime_of(worker.app).config.worker_shutdown_timeout)

        def on_shutting_down(**_: Any) -> None:
            deadline.start()

        worker_shutting_down.connect(on_shutting_down, weak=False)


class SweeperStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped: its base classes are Any
    requires = (RuntimeStep,)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        rt = runtime_of(worker.app)
        self.sweeper = Sweeper(
            rt.store,
            rt.admission,
            rt.enqueue,
            rt.cancel_signal.publish,
            lambda: rt.broker.backlog(GENERATION_QUEUE),
            lease_seconds=rt.config.task_lease_seconds,
            interval=rt.config.sweep_interval,
            relay=rt.broker.relay,
        )

    def start(self, worker: Any) -> None:
        self.sweeper.start()

    def stop(self, worker: Any) -> None:
        self.sweeper.stop()


class CancelListenerStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped: its base classes are Any
    """Generation workers listen for cancels, to cut off the calls of canceled tasks."""

    requires = (RuntimeStep,)

    def include_if(self, worker: Any) -> bool:
        return GENERATION_QUEUE in worker.app.amqp.queues.consume_from

    def create(self, worker: Any) -> CancelListener:
        rt = runtime_of(worker.app)
        self.listener = CancelListener(rt.redis, rt.keys, rt.calls)
        return self.listener

    def start(self, worker: Any) -> None:
        self.listener.start()

    def stop(self, worker: Any) -> None:
        self.listener.stop()


class DispatcherStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped: its base classes are Any
    requires = (RuntimeStep,)

    def include_if(self, worker: Any) -> bool:
        return WEBHOOK_QUEUE in worker.app.amqp.queues.consume_from

    def create(self, worker: Any) -> WebhookDispatcher:
        app = worker.app
        rt = runtime_of(app)
        self.dispatcher = WebhookDispatcher(
            rt.webhooks.outbox,
            lambda event_id, claim: app.send_task(
                DELIVER_WEBHOOK_TASK, args=[event_id, claim], queue=WEBHOOK_QUEUE
            ),
            lambda: rt.broker.backlog(WEBHOOK_QUEUE),
            lease_seconds=rt.config.webhook_lease_seconds,
            interval=rt.config.webhook_dispatch_interval,
        )
        # one line per attempt comes from services.webhooks (without the URL, which may hold a token)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        return self.dispatcher

    def start(self, worker: Any) -> None:
        self.dispatcher.start()
        log.info("webhook dispatcher started (every %.0f ms)", self.dispatcher.interval * 1000)

    def stop(self, worker: Any) -> None:
        self.dispatcher.stop()


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped: its base classes are Any
    """Serves the process's metrics on ``WORKER_METRICS_PORT`` (0: not served). A port that cannot be
    bound is logged, and the worker runs on without its metrics: they never stop a job."""

    requires = (RuntimeStep,)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.port = runtime_of(worker.app).config.worker_metrics_port
        self.server: WSGIServer | None = None

    def include_if(self, worker: Any) -> bool:
        return bool(self.port)

    def start(self, worker: Any) -> None:
        try:
            self.server = metrics.serve(self.port)
        except OSError as exc:
            log.error("metrics not served: port %d (WORKER_METRICS_PORT): %s", self.port, exc)
            return
        # a prefork pool's child: its live gauges go with it (multiprocess mode only)
        worker_process_shutdown.connect(lambda pid, **_: metrics.process_exited(pid), weak=False)
        log.info("metrics served on port %d (/metrics)", self.port)

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class PresenceStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped: its base classes are Any
    """Announces the process once its consumer consumes; withdrawn when the consumer stops."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.presence: Presence | None = None

    def start(self, consumer: Any) -> None:
        rt = runtime_of(consumer.app)
        queues = list(consumer.app.amqp.queues.consume_from)
        slots = consumer.controller.concurrency if GENERATION_QUEUE in queues else 0
        prefetch = consumer.prefetch_multiplier  # what its QoS reserves per slot (--prefetch-multiplier wins)
        self.presence = Presence(rt.redis, rt.keys, consumer.hostname, queues, slots, prefetch)
        self.presence.start()

    def stop(self, consumer: Any) -> None:
        if self.presence is not None:
            self.presence.stop()
            self.presence = None

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)


WORKER_STEPS = (
    RuntimeStep,
    ShutdownDeadlineStep,
    SweeperStep,
    CancelListenerStep,
    DispatcherStep,
    MetricsStep,
)
CONSUMER_STEPS = (PresenceStep,)
