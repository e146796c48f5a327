"""The broker's queues and task names, and the generation message the API pushes itself.

The workers' Celery app (``worker/app.py``) consumes these queues; the API never builds a Celery app: on the
Redis broker it writes the generation message in the same Redis transaction that stores the task
(``generation_message``); on RabbitMQ ``services/broker.py`` publishes the same message from the outbox.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import socket
import uuid
from collections.abc import Sequence

import redis

from services.redis_errors import mapped_redis_errors

GENERATION_QUEUE = "generation"
GENERATE_TASK = "imagegen.generate"
# Webhook deliveries have their own queue (and worker), so that a slow receiver never holds a slot
# that a generation job could use.
WEBHOOK_QUEUE = "webhooks"
DELIVER_WEBHOOK_TASK = "imagegen.deliver_webhook"


def generation_message(task_id: str) -> tuple[str, bytes]:
    """The broker message of one generation job, as (Redis list, message): what ``enqueue_generations``
    would publish, built directly so that the API can push it in the same transaction that stores the
    task (``JobStore.create``), one round trip for both.

    Celery's publish path (``send_task``: message headers, kombu's producer, a new Redis client object
    per message, the queue's declaration) was a large share of the API's CPU per submission (see
    bench/README.md, P1–P5: fix 4, measured by P2). The format is Celery's task protocol 2 in kombu's
    Redis transport envelope; ``tests/test_queue.py`` checks it against a message published by Celery
    itself, which is why pyproject.toml bounds Celery and kombu.
    """
    fields = {
        "body": base64.b64encode(generation_body(task_id)).decode("ascii"),
        "message_id": str(uuid.uuid4()),
        "argsrepr": json.dumps(repr([task_id]))[1:-1],  # the only field a task id could need escaped in
        "delivery_tag": str(uuid.uuid4()),
    }
    return GENERATION_QUEUE, (_envelope_template(_origin()) % fields).encode()


@functools.cache
def _envelope_template(origin: str) -> str:
    """The Redis envelope as JSON text with a ``%(name)s`` where each field of one message goes: built
    once (per process), so that a message costs a few substitutions instead of encoding the whole
    envelope: 24–26 µs → 11–12 µs a message, where it had been ~5 % of the API's CPU per submission in
    P2's profile (bench/README.md, "The Redis client's CPU, and P2 again")."""
    envelope = {
        "body": "@body@",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {**generation_headers("", "@message_id@"), "argsrepr": "@argsrepr@", "origin": origin},
        "properties": {
            "correlation_id": "@message_id@",
            "reply_to": REPLY_TO,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": GENERATION_QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": "@delivery_tag@",
        },
    }
    text = json.dumps(envelope).replace("%", "%%")
    for name in ("body", "message_id", "argsrepr", "delivery_tag"):
        text = text.replace(f"@{name}@", f"%({name})s")
    return text


def generation_body(task_id: str) -> bytes:
    """The body of a generation job's message (Celery's task protocol 2: args, kwargs, embed)."""
    return (_BODY % json.dumps(task_id)).encode()


def generation_headers(task_id: str, message_id: str) -> dict[str, object]:
    """The headers of a generation job's message: Celery's own, for the Redis envelope
    (``generation_message``) and the AMQP message (``services/broker.py``) alike."""
    return {
        **_HEADERS,
        "id": message_id,
        "root_id": message_id,
        "argsrepr": repr([task_id]),
        "origin": _origin(),
    }


REPLY_TO = str(uuid.uuid4())

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_BODY = json.dumps([["@id@"], {}, _EMBED], separators=(", ", ": ")).replace('"@id@"', "%s")
_HEADERS: dict[str, object] = {
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


def _origin() -> str:
    return _origin_of(os.getpid())


@functools.cache
def _origin_of(pid: int) -> str:
    return f"gen{pid}@{socket.gethostname()}"


def enqueue_generations(client: redis.Redis, task_ids: Sequence[str]) -> None:
    """Send generation jobs, in one round trip: the same message the API pushes with a task it admits
    at once (``generation_message``), so there is one way to enqueue. Retries are not sent with a
    countdown: they wait in the store until due, and admission sends them (services/admission.py)."""
    if not task_ids:
        return
    with mapped_redis_errors():
        pipe = client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.lpush(*generation_message(task_id))
        pipe.execute()
