"""services.broker: BROKER_URL, the outbox and its relay (a publish that fails leaves its entry; an entry
leaves the outbox only once RabbitMQ confirmed its message), and the queues and messages on a real
RabbitMQ (a vhost of the test's own; skipped without one)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu.connection import Connection

from devstack.processes import free_port
from services import broker as broker_module
from services.broker import Broker, RabbitBroker, broker_for
from services.config import load_config
from services.errors import BrokerUnavailable, ConfigError
from services.keys import Keys
from services.queue import GENERATE_TASK, GENERATION_QUEUE, WEBHOOK_QUEUE
from services.store import JobStore
from tests.stack import RABBITMQ_SKIP, delete_vhost, list_queues, new_vhost, rabbitmq_available
from worker.app import create_celery

KEYS = Keys("iq")


def rabbit(client: redis.Redis, url: str) -> RabbitBroker:
    broker = broker_for(load_config({"BROKER_URL": url, "STORE_TIMEOUT": "1"}), client, KEYS)
    assert isinstance(broker, RabbitBroker)
    return broker


def outbox(client: redis.Redis) -> list[str]:
    return [entry.decode() for entry in client.lrange(KEYS.outbox, 0, -1)]


@pytest.fixture
def vhost() -> Iterator[tuple[str, str]]:
    """A vhost of the test's own on the machine's RabbitMQ: (name, URL)."""
    if not rabbitmq_available():
        pytest.skip(RABBITMQ_SKIP)
    name, url = new_vhost()
    yield name, url
    delete_vhost(name)


# BROKER_URL -------------------------------------------------------------------------------------------
def test_broker_url_picks_the_broker_and_refuses_what_it_cannot_use() -> None:
    assert load_config({}).broker_url is None and not load_config({}).rabbitmq
    assert load_config({"BROKER_URL": "amqp://u:p@rabbit:5672/vh"}).rabbitmq
    assert load_config({"BROKER_URL": "amqps://u:p@rabbit:5671/vh"}).rabbitmq
    same = "redis://127.0.0.1:6379/0"
    assert not load_config({"BROKER_URL": same, "REDIS_URL": same}).rabbitmq
    with pytest.raises(ConfigError) as unknown:
        load_config({"BROKER_URL": "kafka://secret@host"})
    assert "BROKER_URL" in unknown.value.message and "amqp://" in unknown.value.message
    assert "secret" not in unknown.value.message
    with pytest.raises(ConfigError, match="BROKER_URL may be a redis:// URL only if it is REDIS_URL"):
        load_config({"BROKER_URL": "redis://other:6379/0"})
    with pytest.raises(ConfigError, match="BROKER_DELIVERY_LIMIT"):
        load_config({"BROKER_DELIVERY_LIMIT": "-1"})


def test_the_redis_broker_is_the_store_s_redis(redis_client: redis.Redis) -> None:
    broker = broker_for(load_config({}), redis_client, KEYS)
    assert type(broker) is Broker and broker.after_create is None
    broker.send(["a", "b"])
    assert redis_client.llen(GENERATION_QUEUE) == 2 and broker.backlog(GENERATION_QUEUE) == 2
    assert broker.relay() == 0 and not outbox(redis_client)


# the outbox and its relay, without RabbitMQ -----------------------------------------------------------
def test_a_publish_that_fails_leaves_its_entries_in_the_outbox(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = rabbit(redis_client, f"amqp://guest:guest@127.0.0.1:{free_port()}/")  # nothing listens there
    broker.send(["t1", "t2"])  # into the outbox; the publish fails, and is logged, not raised
    assert sorted(outbox(redis_client)) == ["t1", "t2"]
    with pytest.raises(BrokerUnavailable, match="moments ago"):  # paused: fails at once, no new attempt
        broker.publish([b"t1"])
    monkeypatch.setattr(broker, "_paused_until", 0.0)
    with pytest.raises(BrokerUnavailable, match="ConnectionRefusedError"):
        broker.backlog(GENERATION_QUEUE)
    assert sorted(outbox(redis_client)) == ["t1", "t2"]


class _Producer:
    """Stands for kombu's producer: records what the outbox held when each message was published, and
    fails (as an unconfirmed publish does) on ``fail_on``."""

    def __init__(self, client: redis.Redis, fail_on: str | None = None) -> None:
        self.client = client
        self.fail_on = fail_on
        self.published: list[tuple[str, list[str]]] = []

    def publish(self, body: bytes, **options: Any) -> None:
        task_id = json.loads(body)[0][0]
        if task_id == self.fail_on:
            raise OSError("not confirmed")
        self.published.append((task_id, outbox(self.client)))


def _with_producer(monkeypatch: pytest.MonkeyPatch, broker: RabbitBroker, producer: _Producer) -> None:
    def connect() -> None:
        broker._producer = producer  # type: ignore[assignment]

    monkeypatch.setattr(broker, "_connect", connect)


def test_an_entry_leaves_the_outbox_only_after_its_message_was_confirmed(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = rabbit(redis_client, "amqp://guest:guest@127.0.0.1:5672/unused")
    producer = _Producer(redis_client, fail_on="t2")
    _with_producer(monkeypatch, broker, producer)
    redis_client.lpush(KEYS.outbox, "t1", "t2", "t3")
    with pytest.raises(BrokerUnavailable):
        broker.publish([b"t1", b"t2", b"t3"])
    # t1 was still in the outbox while it was published, and removed once confirmed; t2 was refused,
    # so it and t3 (never tried) stay for the next relay
    assert producer.published == [("t1", ["t3", "t2", "t1"])]
    assert sorted(outbox(redis_client)) == ["t2", "t3"]
    producer.fail_on = None
    monkeypatch.setattr(broker_module, "FAILURE_PAUSE", 0.0)
    monkeypatch.setattr(broker, "_paused_until", 0.0)
    broker.publish([b"t2", b"t3"])
    assert not outbox(redis_client)


def test_the_sweepers_relay_only_entries_older_than_the_grace(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API publishes what it stores at once; a sweeper publishes an entry only once it has seen it
    for RELAY_GRACE, so that the two rarely publish the same entry."""
    broker = rabbit(redis_client, "amqp://guest:guest@127.0.0.1:5672/unused")
    producer = _Producer(redis_client)
    _with_producer(monkeypatch, broker, producer)
    redis_client.lpush(KEYS.outbox, "old")
    assert broker.relay() == 0  # first seen now
    monkeypatch.setattr(broker_module, "RELAY_GRACE", 0.0)
    redis_client.lpush(KEYS.outbox, "new")
    assert broker.relay() == 2
    assert [task_id for task_id, _ in producer.published] == ["old", "new"]
    assert not outbox(redis_client)


def test_the_create_writes_the_outbox_and_names_the_tasks_sent_at_once(redis_client: redis.Redis) -> None:
    broker = rabbit(redis_client, "amqp://guest:guest@127.0.0.1:5672/unused")
    store = JobStore(redis_client)
    told: list[list[str]] = []
    task = store.create(
        model="m",
        payload=b"{}",
        metadata=None,
        message=broker.message,
        sent=lambda ids: told.append(list(ids)),
    )
    assert outbox(redis_client) == [task["id"]] and told == [[task["id"]]]
    assert redis_client.llen(GENERATION_QUEUE) == 0, "nothing in a Redis list on RabbitMQ"


# on RabbitMQ --------------------------------------------------------------------------------------------
def test_quorum_queues_with_a_delivery_limit_and_dead_letter_queues(
    redis_client: redis.Redis, vhost: tuple[str, str]
) -> None:
    name, url = vhost
    broker = rabbit(redis_client, url)
    try:
        broker.send(["t1", "t2"])
        assert not outbox(redis_client), "published and confirmed, then removed"
        assert broker.backlog(GENERATION_QUEUE) == 2 and broker.backlog(WEBHOOK_QUEUE) == 0
        redis_client.lpush(KEYS.outbox, "t3")  # stored, not published yet: counted as waiting too
        assert broker.depths() == {GENERATION_QUEUE: 3, WEBHOOK_QUEUE: 0}
        assert broker.dead_letters() == {"generation.dead": 0, "webhooks.dead": 0}
    finally:
        broker.close()
    queues = list_queues(name)
    for queue in (GENERATION_QUEUE, WEBHOOK_QUEUE):
        assert queues[queue]["type"] == "quorum"
        assert "x-delivery-limit" in queues[queue]["arguments"]
        assert "imagegen.dead" in queues[queue]["arguments"]
        assert queues[queue + ".dead"]["type"] == "quorum"


def test_the_published_message_is_the_one_celery_publishes(
    redis_client: redis.Redis, vhost: tuple[str, str]
) -> None:
    _, url = vhost
    config = load_config({"BROKER_URL": url})
    broker = rabbit(redis_client, url)
    app = create_celery(config)
    try:
        broker.send(["task-1"])  # declares the queues as Celery does: a mismatch would fail here
        app.send_task(GENERATE_TASK, args=["task-1"], queue=GENERATION_QUEUE)
    finally:
        app.close()
        broker.close()
    with Connection(url) as connection:
        channel = connection.default_channel
        ours, theirs = channel.basic_get(GENERATION_QUEUE), channel.basic_get(GENERATION_QUEUE)
        assert ours is not None and theirs is not None
    assert json.loads(ours.body) == json.loads(theirs.body)
    varying = {"id", "root_id", "origin"}
    assert {k: v for k, v in ours.headers.items() if k not in varying} == {
        k: v for k, v in theirs.headers.items() if k not in varying
    }
    for field in ("content_type", "content_encoding", "delivery_mode", "priority"):
        assert ours.properties.get(field) == theirs.properties.get(field), field
    assert ours.headers["id"] == ours.properties["correlation_id"]
