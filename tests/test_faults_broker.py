"""Fault tests of what only RabbitMQ has (``BROKER_URL=amqp://…``, ``services/broker.py``): the outbox
between the store and RabbitMQ, and the delivery limit with its dead-letter queue. The faults both brokers
share (a worker SIGKILLed, lost messages, upstream faults, a kill under the cap) run on both, in
test_faults*.py (``both_brokers``). Skipped, saying why, on a machine without RabbitMQ."""

from __future__ import annotations

import json
import time

import pytest
from kombu.connection import Connection

from devstack.processes import wait_until
from services.broker import RabbitBroker
from services.clock import parse_iso
from tests.fault_kit import (
    LEASE,
    on_broker,
    paid_twice,
    settle_succeeded,
    slow_bodies,
    submit_many,
    worker_holding_calls,
)
from tests.receiver import Receiver
from tests.report import FaultRow, record
from tests.stack import Stack, close_connections

pytestmark = [pytest.mark.timeout(240), pytest.mark.parametrize("fault_stack", ["rabbitmq"], indirect=True)]


def rabbit(stack: Stack) -> RabbitBroker:
    broker = stack.runtime.broker
    assert isinstance(broker, RabbitBroker)
    return broker


def test_tasks_stored_but_never_published_are_relayed_by_the_sweeper(fault_stack: Stack) -> None:
    """An API process killed between storing tasks and publishing them: their ids wait in the outbox,
    written by the create script in the same step as the tasks; a sweeper publishes them (a second
    after it first sees them) and each runs once. The tasks submitted meanwhile ask for webhooks, which
    go through RabbitMQ's ``webhooks`` queue; the metrics read both queues' depths from RabbitMQ."""
    stack = fault_stack
    receiver = Receiver(stack.env["WEBHOOK_SIGNING_SECRET"])
    broker = rabbit(stack)
    store = stack.runtime.store
    orphan_bodies = slow_bodies(10, 100)
    created = time.time()
    orphans = [
        store.create(  # what the API does, but for the publish right after it (``sent``): it "died"
            model=body["model"],
            payload=json.dumps(body).encode(),
            metadata=None,
            tenant="fault-a",
            message=broker.message,
        )["id"]
        for body in orphan_bodies
    ]
    stack.owners.update(dict.fromkeys(orphans, "fault-a"))
    client = stack.runtime.redis
    in_outbox = client.llen(stack.runtime.keys.outbox)
    assert in_outbox == len(orphans), "stored means in the outbox"
    sent_bodies = [{**body, "webhook_url": receiver.url("/hooks/rabbit")} for body in slow_bodies(10, 100)]
    try:
        ids = orphans + submit_many(stack, sent_bodies)
        tasks = settle_succeeded(stack, ids, timeout=60)
        delivered = receiver.wait_for("/hooks/rabbit", len(sent_bodies))
    finally:
        receiver.stop()
    # (signed with each tenant's own secret, which the receiver does not know: test_webhooks checks them)
    assert len({item.headers["webhook-id"] for item in delivered}) == len(sent_bodies)
    scraped = stack.http.get(f"{stack.api_url}/metrics").text
    assert 'imagegen_queue_depth{queue="generation"} 0.0' in scraped, scraped
    assert 'imagegen_queue_depth{queue="webhooks"} 0.0' in scraped
    assert client.llen(stack.runtime.keys.outbox) == 0, "every entry removed once its publish was confirmed"
    assert all(len(tasks[task_id]["attempts"]) == 1 for task_id in ids)
    duplicates = paid_twice(stack, orphan_bodies + sent_bodies)
    assert duplicates == 0
    recovery = max(parse_iso(tasks[task_id]["started_at"]).timestamp() - created for task_id in orphans)
    assert recovery < LEASE + 3, "relayed from the outbox, not found lost a lease later"
    record(
        FaultRow(
            on_broker(stack, "API killed between storing 10 tasks and publishing them (outbox), 10 sent"),
            len(ids),
            len(ids),
            0,
            0,
            duplicates,
            f"started {recovery:.1f}s after creation",
            note="a sweeper published the outbox entries (publisher confirms), each removed once confirmed; "
            "the 10 sent asked for webhooks, delivered through RabbitMQ",
        )
    )


def _hold_messages(url: str, at_least: int, timeout: float = 30) -> list[str]:
    """Consume generation messages as a worker would, without acknowledging any, until ``at_least`` are
    held; then drop the connection, as a consumer that dies does: RabbitMQ takes them back. Returns the
    task ids held."""
    held: list[str] = []
    with Connection(url) as connection:
        channel = connection.channel()
        channel.basic_qos(0, at_least, False)
        channel.basic_consume(
            "generation", callback=lambda message: held.append(json.loads(message.body)[0][0])
        )

        def enough() -> bool:
            try:
                connection.drain_events(timeout=0.2)
            except TimeoutError:  # socket.timeout: nothing came within 0.2 s
                pass
            return len(held) >= at_least

        wait_until(enough, timeout=timeout, what=f"{at_least} messages held by the failing consumer")
    return held


@pytest.mark.stack(BROKER_DELIVERY_LIMIT="0", WORKER_CONCURRENCY="4")
def test_messages_past_the_delivery_limit_are_dead_lettered_and_their_tasks_still_run(
    fault_stack: Stack,
) -> None:
    """A consumer takes messages and dies without acknowledging them, with a delivery limit of 0: RabbitMQ
    dead-letters each (``generation.dead``) instead of delivering it again. Their tasks are still queued in
    the store: the sweeper's lost-message check finds them (waiting longer than a lease with nothing ready
    in the queue) and sends them again. Each runs once; nothing is lost or stuck."""
    stack = fault_stack
    broker = rabbit(stack)
    bodies = slow_bodies(24, 1500)
    ids = submit_many(stack, bodies)  # 8 worker slots: the rest wait for admission, sent as slots free up
    held = _hold_messages(stack.env["BROKER_URL"], 3)
    dropped_at = time.time()
    queued = [task_id for task_id in held if stack.stored(task_id)["status"] == "queued"]
    tasks = settle_succeeded(stack, ids, timeout=90)
    dead = broker.dead_letters()["generation.dead"]
    assert dead >= len(held), f"{dead} dead-lettered, {len(held)} held by the failing consumer"
    assert all(len(tasks[task_id]["attempts"]) == 1 for task_id in held), "a dead letter is sent once more"
    duplicates = paid_twice(stack, bodies)
    assert duplicates == 0
    recovery = max(parse_iso(tasks[task_id]["started_at"]).timestamp() - dropped_at for task_id in held)
    record(
        FaultRow(
            on_broker(
                stack, "a consumer dies holding 3 messages, delivery limit 0 (dead-letter queue), 24 tasks"
            ),
            len(ids),
            len(ids),
            0,
            0,
            duplicates,
            f"held tasks started {recovery:.1f}s after the drop (lease {LEASE:.0f}s)",
            note=f"{dead} message(s) in generation.dead; {len(queued)} of the held tasks still queued at the "
            "drop, sent again by the lost-message check",
        )
    )


def test_rabbitmq_drops_every_connection_with_calls_in_flight(fault_stack: Stack) -> None:
    """RabbitMQ closes every connection of the stack's vhost (the workers', the API's publisher) while
    calls are in flight and submissions go on. The workers' unacknowledged messages go back to the queue;
    their tasks keep running under their leases, so the messages delivered again find them running (or
    final) and do nothing. Workers and publishers connect again; every task runs once."""
    stack = fault_stack
    assert stack.vhost is not None
    first = slow_bodies(30, 2000)
    ids = submit_many(stack, first)
    worker_holding_calls(stack, first, ids, 20)
    dropped_at = time.time()
    close_connections(stack.vhost)
    then = slow_bodies(20, 300)
    ids += submit_many(stack, then)  # published at once if the API's connection is back, else relayed
    tasks = settle_succeeded(stack, ids, timeout=90)
    assert all(len(tasks[task_id]["attempts"]) == 1 for task_id in ids), "no task ran twice"
    duplicates = paid_twice(stack, first + then)
    assert duplicates == 0
    finished = max(parse_iso(task["finished_at"]).timestamp() for task in tasks.values())
    record(
        FaultRow(
            on_broker(stack, "RabbitMQ closes every connection (workers, API) with 20+ calls in flight"),
            len(ids),
            len(ids),
            0,
            0,
            duplicates,
            f"all done {finished - dropped_at:.1f}s after the drop",
            note="the redelivered messages found their tasks running or final; 20 more submitted after the "
            "drop, each run once",
        )
    )
