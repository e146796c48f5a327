"""services.queue: the generation message the API pushes itself is the one Celery would publish."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis

from devstack.processes import start_worker, wait_until
from services.config import load_config
from services.queue import GENERATE_TASK, GENERATION_QUEUE, generation_message
from tests.stack import Stack
from worker.app import create_celery

# what differs between two messages of the same job: fresh ids, and who sent it
_VARYING_HEADERS = {"id", "root_id", "origin"}
_VARYING_PROPERTIES = {"correlation_id", "reply_to", "delivery_tag"}


@pytest.fixture
def spare_db(stack: Stack) -> Iterator[tuple[str, redis.Redis]]:
    """A Redis database no worker consumes from (the stack's workers use db 0)."""
    url = stack.env["REDIS_URL"].rsplit("/", 1)[0] + "/13"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


def _decoded(raw: bytes) -> dict:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_generation_message_matches_what_celery_publishes(spare_db: tuple[str, redis.Redis]) -> None:
    url, client = spare_db
    app = create_celery(load_config({"REDIS_URL": url}))
    try:
        app.send_task(GENERATE_TASK, args=["task-1"], queue=GENERATION_QUEUE)
    finally:
        app.close()
    (published,) = client.lrange(GENERATION_QUEUE, 0, -1)
    queue, ours = generation_message("task-1")
    assert queue == GENERATION_QUEUE
    theirs, mine = _decoded(published), _decoded(ours)
    assert mine["body"] == theirs["body"] == [["task-1"], {}, mine["body"][2]]
    for section, varying in (("headers", _VARYING_HEADERS), ("properties", _VARYING_PROPERTIES)):
        assert mine[section].keys() == theirs[section].keys()
        assert {k: v for k, v in mine[section].items() if k not in varying} == {
            k: v for k, v in theirs[section].items() if k not in varying
        }
    assert {k: v for k, v in mine.items() if k not in ("headers", "properties")} == {
        k: v for k, v in theirs.items() if k not in ("headers", "properties")
    }
    assert mine["headers"]["id"] == mine["headers"]["root_id"] == mine["properties"]["correlation_id"]
    again = _decoded(generation_message("task-1")[1])
    assert again["headers"]["id"] != mine["headers"]["id"]
    assert again["properties"]["delivery_tag"] != mine["properties"]["delivery_tag"]


def test_a_worker_sizes_its_clients_for_the_pool_it_runs(stack: Stack) -> None:
    """``--concurrency`` on the command line wins over ``WORKER_CONCURRENCY`` (16 in the stack): the S3
    and Redis connection pools are sized for the threads that really run."""
    env = {**stack.env, "WORKER_CONCURRENCY": "16"}
    worker = start_worker(env, log_dir=stack.log_dir, name="sized", concurrency=70, queues="sized-idle")
    try:
        wait_until(lambda: "clients sized for a pool of" in worker.tail(200), timeout=30, what="the worker")
        assert "clients sized for a pool of 70" in worker.tail(200)
    finally:
        worker.stop()
