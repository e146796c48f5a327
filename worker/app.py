"""The Celery app of the workers, built from the configuration, with the worker's bootsteps.

Configured for no loss: a message is acknowledged only after its task returns (``acks_late``), a task
whose worker dies is given back (``reject_on_worker_lost``), and Redis hands an unacknowledged message to
another worker only after ``visibility_timeout`` seconds, which config checks is longer than the longest
upstream call. On RabbitMQ (``BROKER_URL=amqp://…``) the queues are quorum queues with a delivery limit
and a dead-letter queue, and publishes are confirmed (``services/broker.py``); RabbitMQ gives a dead
worker's unacknowledged messages back at once, and the store's lease keeps a second worker from running a
task whose first worker may still be alive.

Each worker process reserves ``WORKER_PREFETCH_MULTIPLIER`` messages per slot; the default 1 is what the
no-loss configuration asks: with the threads pool every reserved message is running, so a killed worker
strands no waiting message. 2 keeps a successor waiting for each slot, so a wave of jobs finishing
together is refilled at once: the worker announces twice its slots to admission, which then hands
the successors out (``services/presence.py``; bench/README.md, P1–P5: fix 3 and "Prefetch,
re-measured"). The price is that a killed worker strands its waiting messages until the visibility
timeout, or until the sweeper finds their tasks still queued once the broker's queue is empty (none is
lost, they are late).

The API never builds this app: it pushes the generation message itself (``services/queue.py``).
"""

from __future__ import annotations

from celery import Celery

from services.broker import celery_broker_settings
from services.config import Config, load_config
from services.queue import DELIVER_WEBHOOK_TASK, GENERATE_TASK, GENERATION_QUEUE, WEBHOOK_QUEUE
from worker import logs, steps


def create_celery(config: Config) -> Celery:
    """The Celery app for ``config``: the broker, the queues and the no-loss settings."""
    broker = celery_broker_settings(config)  # Redis or RabbitMQ (services/broker.py)
    app = Celery("imagegen", broker=broker.pop("broker_url"), set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=config.worker_prefetch_multiplier,
        task_ignore_result=True,
        task_default_queue=GENERATION_QUEUE,
        task_routes={
            GENERATE_TASK: {"queue": GENERATION_QUEUE},
            DELIVER_WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        **broker,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        worker_concurrency=config.worker_concurrency,
        worker_pool=config.worker_pool,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.conf.iq_config = config
    return app


def create_worker_app(config: Config | None = None) -> Celery:
    """The app ``celery -A worker.main worker`` runs: tasks, and the bootsteps that build the process's
    clients and start its background threads (``worker/steps.py``), with the logging ``LOG_FORMAT`` asks
    for (``worker/logs.py``)."""
    config = config or load_config()
    logs.install(config)
    app = create_celery(config)
    app.conf.imports = ("worker.tasks",)
    for step in steps.WORKER_STEPS:
        app.steps["worker"].add(step)
    for step in steps.CONSUMER_STEPS:
        app.steps["consumer"].add(step)
    return app
