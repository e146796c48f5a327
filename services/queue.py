"""The Celery app both sides share: the API sends by task name, the worker registers the tasks.

Configured for no loss: a message is acknowledged only after its task returns (``acks_late``), a task
whose worker dies is given back (``reject_on_worker_lost``), and Redis hands an unacknowledged message to
another worker only after ``visibility_timeout`` seconds, which config checks is longer than the longest
upstream call.

Each worker process reserves one message per slot (``WORKER_PREFETCH_MULTIPLIER=1``, as the no-loss
configuration asks): with the threads pool every reserved message is running, so a killed worker strands
no waiting message. 2 keeps a successor waiting in the pool for each slot, so a wave of jobs finishing
together is refilled at once instead of one BRPOP at a time, which brings P1a's makespan closer to ideal
(see bench/README.md, P1–P5: fix 3 and "Prefetch, re-measured"); the price is that a killed worker
strands its waiting messages until the visibility timeout, or until the sweeper finds their tasks still
queued once the broker's queue is empty (services/sweeper.py; none is lost, they are late), and that a
small burst can wait in one busy worker while another has free slots.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import socket
import uuid

import redis
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
        worker_prefetch_multiplier=config.worker_prefetch_multiplier,
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


def generation_message(task_id: str) -> tuple[str, bytes]:
    """The broker message of one generation job, as (Redis list, message): what ``enqueue_generation``
    would publish, built directly so that the API can push it in the same transaction that stores the
    task (``JobStore.create``), one round trip for both.

    Celery's publish path (``send_task``: message headers, kombu's producer, a new Redis client object
    per message, the queue's declaration) was a large share of the API's CPU per submission (see
    bench/README.md, P1–P5: fix 4, measured by P2). The format is Celery's task protocol 2 in kombu's
    Redis transport envelope; ``tests/test_queue.py`` checks it against a message published by Celery
    itself.
    """
    message_id = str(uuid.uuid4())
    body = json.dumps([[task_id], {}, _EMBED], separators=(", ", ": ")).encode()
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            **_HEADERS,
            "id": message_id,
            "root_id": message_id,
            "argsrepr": repr([task_id]),
            "origin": _origin(),
        },
        "properties": {
            "correlation_id": message_id,
            "reply_to": _REPLY_TO,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": GENERATION_QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return GENERATION_QUEUE, json.dumps(envelope).encode()


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_HEADERS = {
    "lang": "py",
    "task": GENERATE_TASK,
    "shadow": None,
    "eta": None,
    "expires": None,
    "group": None,
    "group_index": None,
    "retries": 0,
    "timelimit": [None, None],
    "parent_id": None,
    "kwargsrepr": "{}",
    "ignore_result": None,
    "replaced_task_nesting": 0,
    "stamped_headers": None,
    "stamps": {},
}
_REPLY_TO = str(uuid.uuid4())


def _origin() -> str:
    return _origin_of(os.getpid())


@functools.cache
def _origin_of(pid: int) -> str:
    return f"gen{pid}@{socket.gethostname()}"


def enqueue_generation(client: redis.Redis, task_id: str) -> None:
    """Send one generation job: the same message the API pushes with the task (``generation_message``),
    so there is one way to enqueue. Retries are not sent with a countdown: they wait in the store until
    due, and the sweeper sends them (services/sweeper.py)."""
    client.lpush(*generation_message(task_id))


def enqueue_webhook(app: Celery, event_id: str, claim: str) -> None:
    """Send one webhook delivery; the event and its state stay in the store (services/webhooks.py)."""
    app.send_task(DELIVER_WEBHOOK_TASK, args=[event_id, claim], queue=WEBHOOK_QUEUE)
