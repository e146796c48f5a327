"""The broker: where generation jobs are sent, how many messages wait there, and the Celery settings that
go with it. ``broker_for(config, …)`` picks one of two, behind one interface (``Broker``):

- **Redis** (``BROKER_URL`` unset: the store's Redis). The create script pushes each admitted task's
  Celery message to the ``generation`` list in the step that stores the task (``Broker.message`` is
  ``services.queue.generation_message``), so stored means enqueued, in one round trip; admission and the
  sweeper push messages the same way (``send``). The depth of a queue is its list's length.
- **RabbitMQ** (``BROKER_URL=amqp://…``, ``RabbitBroker``). The store cannot publish to RabbitMQ inside a
  Redis script, so it writes the task's id into an outbox list (``{p}:outbox``) in that same step instead
  (``message``); a relay then publishes each entry with a publisher confirm and removes it only once
  RabbitMQ confirmed it. The API relays the tasks it has just stored at once (``after_create``), and every
  sweeper relays entries still there a second later (``relay``): those of an API process killed between
  storing and publishing, or that could not reach RabbitMQ. An entry published twice (both relayed it)
  is a duplicate message, which the store ignores (it runs one attempt of a task at a time and leaves
  running and final tasks alone, and tasks waiting for a retry that is not due). The queues are quorum
  queues (durable, replicated), with a delivery limit (``BROKER_DELIVERY_LIMIT``) past which a message
  goes to a dead-letter queue (``generation.dead``, ``webhooks.dead``). A dead-lettered message loses
  no task: its task is still queued (the sweeper's lost-message check sends it again) or running (its
  lease expires and the sweeper sends it again); ``MAX_ATTEMPTS`` ends a task whose every attempt loses
  its worker.

The lost-message check (``services/sweeper.py``) asks ``backlog``: messages ready in the queue, plus, on
RabbitMQ, outbox entries not published yet. Neither counts messages a worker holds unacknowledged (on
Redis they sit in kombu's unacked hash, on RabbitMQ they are not "ready"): with the default prefetch
every one of them is a running task, which the check never looks at (it reads ``{p}:queued``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import redis
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Producer

from services.config import Config
from services.errors import BrokerUnavailable
from services.keys import Keys
from services.queue import (
    GENERATION_QUEUE,
    REPLY_TO,
    WEBHOOK_QUEUE,
    enqueue_generations,
    generation_body,
    generation_headers,
    generation_message,
)
from services.redis_connection import broker_transport_options, broker_url, broker_use_ssl
from services.redis_errors import mapped_redis_errors

log = logging.getLogger(__name__)

DEAD_LETTER_EXCHANGE = "imagegen.dead"
DEAD_SUFFIX = ".dead"
DEAD_MAX_LENGTH = 100_000  # messages a dead-letter queue keeps (the oldest go first): for inspection only
RELAY_GRACE = 1.0  # s: an outbox entry the API has not published by then is the sweepers' to publish
RELAY_BATCH = 500
# s: after a failed call, calls fail at once for this long instead of each waiting for RabbitMQ's timeout
# (a black-holed host would otherwise hold every submission's 202 for STORE_TIMEOUT); the outbox keeps
# what could not be published, and the sweepers publish it once RabbitMQ answers again
FAILURE_PAUSE = 2.0


class Broker:
    """The Redis broker: the store's Redis, Celery's messages in its lists."""

    name = "redis"

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    @property
    def message(self) -> Callable[[str], tuple[str, bytes]]:
        """What the create script pushes for a task sent at once: (list, entry)."""
        return generation_message

    @property
    def after_create(self) -> Callable[[Sequence[str]], None] | None:
        """What the API calls with the tasks the create sent at once; None: the script sent them."""
        return None

    def send(self, task_ids: Sequence[str]) -> None:
        """Send generation jobs (admission's hand-off, the sweeper's recoveries)."""
        enqueue_generations(self._redis, task_ids)

    def relay(self) -> int:
        """Publish what waits in the outbox (RabbitMQ only); return how many were published."""
        return 0

    def backlog(self, queue: str) -> int:
        """Messages of ``queue`` waiting for a worker (not those a worker holds)."""
        with mapped_redis_errors():
            return int(self._redis.llen(queue))

    def depths(self) -> dict[str, int] | None:
        """The queues' depths for the metrics; None: read by the scrape's own Redis pipeline (LLEN)."""
        return None

    def close(self) -> None:
        pass


class RabbitBroker(Broker):
    """RabbitMQ: quorum queues, publisher confirms, and the outbox in Redis (see the module's docstring).

    One AMQP connection per process, used under a lock (py-amqp's channels are not thread-safe); a call
    that fails drops it, calls fail at once for ``FAILURE_PAUSE``, and the next call after that connects
    again."""

    name = "rabbitmq"

    def __init__(self, client: redis.Redis, keys: Keys, config: Config) -> None:
        super().__init__(client, keys)
        self._config = config
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._first_seen: dict[bytes, float] = {}
        self._paused_until = 0.0

    @property
    def message(self) -> Callable[[str], tuple[str, bytes]]:
        outbox = self._keys.outbox
        return lambda task_id: (outbox, task_id.encode())

    @property
    def after_create(self) -> Callable[[Sequence[str]], None] | None:
        return self._publish_now

    def send(self, task_ids: Sequence[str]) -> None:
        """Into the outbox (one round trip), then published at once; what cannot be published now stays
        in the outbox for the sweepers."""
        if not task_ids:
            return
        with mapped_redis_errors():
            self._redis.lpush(self._keys.outbox, *task_ids)
        self._publish_now(task_ids)

    def _publish_now(self, task_ids: Sequence[str]) -> None:
        if self._paused:  # failed moments ago (and said so): the sweepers publish these
            return
        try:
            self.publish([task_id.encode() for task_id in task_ids])
        except BrokerUnavailable as exc:
            log.warning("%d job(s) left in the outbox for the sweepers: %s", len(task_ids), exc.message)

    @property
    def _paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def relay(self) -> int:
        """Publish the outbox's entries that have waited at least ``RELAY_GRACE`` (by this process's
        watch: the API publishes its own at once, so younger ones are most likely being published).
        Nothing is tried while paused after a failure (``FAILURE_PAUSE``)."""
        if self._paused:
            return 0
        with mapped_redis_errors():
            newest_first = cast("list[bytes]", self._redis.lrange(self._keys.outbox, -RELAY_BATCH, -1))
        entries = newest_first[::-1]  # the oldest first
        now = time.monotonic()
        self._first_seen = {entry: self._first_seen.get(entry, now) for entry in entries}
        due = [entry for entry, seen in self._first_seen.items() if now - seen >= RELAY_GRACE]
        if due:
            self.publish(due)
            for entry in due:
                self._first_seen.pop(entry, None)
        return len(due)

    def publish(self, entries: Sequence[bytes]) -> None:
        """Publish one generation message per outbox entry (a task id), each confirmed by RabbitMQ, then
        remove the entries from the outbox: an entry is removed only after its message was confirmed."""
        published: list[bytes] = []
        try:
            with self._channel() as producer:
                for entry in entries:
                    _publish_generation(producer, entry.decode())
                    published.append(entry)
        finally:
            if published:
                with mapped_redis_errors():
                    pipe = self._redis.pipeline(transaction=False)
                    for entry in published:
                        pipe.lrem(self._keys.outbox, 1, entry.decode())
                    pipe.execute()

    def backlog(self, queue: str) -> int:
        """Ready messages of ``queue`` (a passive declare's ``message_count``: not those delivered and
        unacknowledged) and, for ``generation``, the outbox's entries not published yet."""
        with self._channel() as producer:
            _, ready, _ = producer.channel.queue_declare(queue=queue, passive=True)
        if queue != GENERATION_QUEUE:
            return int(ready)
        with mapped_redis_errors():
            return int(ready) + int(self._redis.llen(self._keys.outbox))

    def depths(self) -> dict[str, int] | None:
        return {queue: self.backlog(queue) for queue in (GENERATION_QUEUE, WEBHOOK_QUEUE)}

    def dead_letters(self) -> dict[str, int]:
        """How many messages each dead-letter queue holds."""
        counts = {}
        with self._channel() as producer:
            for queue in dead_letter_queues():
                _, count, _ = producer.channel.queue_declare(queue=queue.name, passive=True)
                counts[queue.name] = int(count)
        return counts

    @contextmanager
    def _channel(self) -> Iterator[Producer]:
        """The process's producer, connected (and the queues declared) on first use; any error drops the
        connection and is raised as ``BrokerUnavailable``."""
        with self._lock:
            if self._paused:
                raise BrokerUnavailable("RabbitMQ failed moments ago; tried again shortly")
            try:
                if self._producer is None:
                    self._connect()
                assert self._producer is not None
                yield self._producer
            except Exception as exc:
                self._drop()
                self._paused_until = time.monotonic() + FAILURE_PAUSE
                raise BrokerUnavailable(f"RabbitMQ: {type(exc).__name__}: {exc}") from exc

    def _connect(self) -> None:
        timeout = self._config.store_timeout
        connection = Connection(
            self._config.broker_url,
            connect_timeout=timeout,
            ssl=self._config.rabbitmq_tls,
            transport_options={"confirm_publish": True, "read_timeout": timeout, "write_timeout": timeout},
        )
        connection.connect()
        self._connection = connection
        channel = connection.default_channel
        for queue in (*amqp_queues(self._config), *dead_letter_queues()):
            queue(channel).declare()
        self._producer = Producer(channel)

    def _drop(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - it is being dropped because it failed
                log.debug("closing a failed RabbitMQ connection failed too", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._drop()


def _publish_generation(producer: Producer, task_id: str) -> None:
    """The message Celery would publish for ``imagegen.generate(task_id)`` (``services/queue.py``),
    persistent, to the ``generation`` queue, confirmed (``confirm_publish``: returns once RabbitMQ has
    it, raises if it refused it)."""
    message_id = str(uuid.uuid4())
    producer.publish(
        generation_body(task_id),
        exchange="",
        routing_key=GENERATION_QUEUE,
        content_type="application/json",
        content_encoding="utf-8",
        headers=generation_headers(task_id, message_id),
        correlation_id=message_id,
        reply_to=REPLY_TO,
        delivery_mode=2,
        priority=0,
        retry=False,
    )


def broker_for(config: Config, client: redis.Redis, keys: Keys) -> Broker:
    return RabbitBroker(client, keys, config) if config.rabbitmq else Broker(client, keys)


# the queues on RabbitMQ -----------------------------------------------------------------------------
def amqp_queues(config: Config) -> tuple[Queue, ...]:
    """The consumed queues, as Celery (``task_queues``) and the relay declare them: declarations must
    agree, or RabbitMQ refuses the second (PRECONDITION_FAILED)."""
    return tuple(
        Queue(
            name,
            Exchange(name, "direct"),
            routing_key=name,
            durable=True,
            queue_arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": config.broker_delivery_limit,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-dead-letter-routing-key": name + DEAD_SUFFIX,
            },
        )
        for name in (GENERATION_QUEUE, WEBHOOK_QUEUE)
    )


def dead_letter_queues() -> tuple[Queue, ...]:
    exchange = Exchange(DEAD_LETTER_EXCHANGE, "direct")
    return tuple(
        Queue(
            name + DEAD_SUFFIX,
            exchange,
            routing_key=name + DEAD_SUFFIX,
            durable=True,
            queue_arguments={
                "x-queue-type": "quorum",
                "x-max-length": DEAD_MAX_LENGTH,
                "x-overflow": "drop-head",
            },
        )
        for name in (GENERATION_QUEUE, WEBHOOK_QUEUE)
    )


def celery_broker_settings(config: Config) -> dict[str, Any]:
    """The Celery settings that depend on the broker (``worker/app.py``)."""
    if config.rabbitmq:
        return {
            "broker_url": config.broker_url,
            "broker_transport_options": {"confirm_publish": True},
            "task_queues": amqp_queues(config),
            "task_default_queue_type": "quorum",
            "worker_detect_quorum_queues": True,
            "broker_use_ssl": config.rabbitmq_tls,
        }
    settings: dict[str, Any] = {
        "broker_url": broker_url(config),
        "broker_transport_options": {
            "visibility_timeout": config.visibility_timeout,
            "socket_timeout": config.store_timeout,
            "socket_connect_timeout": config.store_timeout,
            **broker_transport_options(config),  # with sentinels: the primary's name, the sentinels' settings
        },
    }
    ssl = broker_use_ssl(config)
    if ssl:
        settings["broker_use_ssl"] = ssl
    return settings
