"""The Celery app both sides share: the API sends by task name, the worker registers the tasks.

Configured for no loss: a message is acknowledged only after its task returns (``acks_late``), a task
whose worker dies is given back (``reject_on_worker_lost``), and Redis hands an unacknowledged message to
another worker only after ``visibility_timeout`` seconds, which config checks is longer than the longest
upstream call.

Each worker process reserves two messages per slot (``prefetch_multiplier=2``): one running, one
waiting in the thread pool's own queue. With one per slot, every job's successor had to be fetched
after it finished (ack, then the consumer's next loop tick, then one BRPOP per message, all in the
consumer thread competing for the GIL with the busy slots), and a wave of jobs finishing together
was refilled in bursts over up to 0.5 s (bench/README.md, P1a: 1.22× ideal against 1.13×). A worker
that is killed strands its waiting messages until the visibility timeout, or until the sweeper finds
their tasks still queued once the broker's queue is empty (services/sweeper.py); none is lost.
"""

from __future__ import annotations

from celery import Celery

from services.config import Config

GENERATION_QUEUE = "generation"
GENERATE_TASK = "imagegen.generate"
# Webhook deliveries have their own queue (and worker), so that a slow receiver never holds a slot
# that a generation job could use.
WEBHOOK_QUEUE = "webhooks"
DELIVER_WEBHOOK_TASK = "imagegen.deliver_webhook"


def create_celery(config: Config) -> Celery:
    app = Celery("imagegen", broker=config.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=2,
        task_ignore_result=True,
        task_default_queue=GENERATION_QUEUE,
        task_routes={
            GENERATE_TASK: {"queue": GENERATION_QUEUE},
            DELIVER_WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={
            "visibility_timeout": config.visibility_timeout,
            "socket_timeout": config.store_timeout,
            "socket_connect_timeout": config.store_timeout,
        },
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


def enqueue_generation(app: Celery, task_id: str) -> None:
    """Send one generation job; the message carries only the task id. Retries are not sent with a
    countdown: they wait in the store until due, and the sweeper sends them (services/sweeper.py)."""
    app.send_task(GENERATE_TASK, args=[task_id], queue=GENERATION_QUEUE)


def enqueue_webhook(app: Celery, event_id: str, claim: str) -> None:
    """Send one webhook delivery; the event and its state stay in the store (services/webhooks.py)."""
    app.send_task(DELIVER_WEBHOOK_TASK, args=[event_id, claim], queue=WEBHOOK_QUEUE)
