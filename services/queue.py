"""The Celery app both sides share: the API sends by task name, the worker registers the tasks.

Configured for no loss: a message is acknowledged only after its task returns (``acks_late``), a task
whose worker dies is given back (``reject_on_worker_lost``), each worker process reserves one message per
free slot (``prefetch_multiplier=1``), and Redis hands an unacknowledged message to another worker only
after ``visibility_timeout`` seconds, which config checks is longer than the longest upstream call.
"""

from __future__ import annotations

from celery import Celery

from services.config import Config

GENERATION_QUEUE = "generation"
GENERATE_TASK = "imagegen.generate"


def create_celery(config: Config) -> Celery:
    app = Celery("imagegen", broker=config.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=GENERATION_QUEUE,
        task_routes={GENERATE_TASK: {"queue": GENERATION_QUEUE}},
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
