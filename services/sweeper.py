"""The sweeper: the store, not the broker, decides what must run, and this puts it on the queue.

Every worker process runs one in a thread; any number of copies are safe, because each claim is atomic
and hands a task to one sweeper only. Each tick it:

- puts tasks whose retry is due back in their tenant's ready set (retries wait in the store's
  ``delayed`` set, not in a Celery countdown that a dying worker would take along for the broker's
  visibility timeout, an hour by default), and admits waiting tasks while there is room
  (``services/admission.py``);

cancels tasks past their ``Cancel-After`` deadline (and cuts their calls off: ``cut_off``), and enqueues:

- running tasks whose lease expired: their worker was SIGKILLed or its host vanished. They run again
  within ``TASK_LEASE_SECONDS`` (the new attempt closes the lost one as ``worker_lost``);
- queued tasks whose message was lost (an API process killed between storing and enqueueing, a broker
  that lost its last second of writes, a message dead-lettered on RabbitMQ past its delivery limit):
  those waiting longer than a lease while the broker's queue is empty (on RabbitMQ: no message ready
  and nothing in the outbox; not read, nothing is taken for lost). A duplicate message this may make is
  harmless: the store lets one attempt run at a time and ignores messages for tasks that are running,
  final, or waiting for a retry that is not due yet.

On RabbitMQ it also relays the outbox first: task ids stored for publishing that the API process did not
publish within a second (``services/broker.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from services.admission import Admission
from services.errors import BrokerUnavailable, InvalidTransition, NotFound
from services.periodic import Periodic
from services.store import DEADLINE_EXCEEDED, JobStore

log = logging.getLogger(__name__)

CLAIM_BATCH = 500  # per kind and tick; a tick that fills a batch is followed by another at once


class Sweeper:
    def __init__(
        self,
        store: JobStore,
        admission: Admission,
        enqueue: Callable[[Sequence[str]], None],
        cut_off: Callable[[str], None],
        broker_backlog: Callable[[], int],
        *,
        lease_seconds: float,
        interval: float,
        relay: Callable[[], int] = lambda: 0,
    ) -> None:
        """``broker_backlog``: the generation messages waiting for a worker (``Broker.backlog``);
        ``relay``: publishes the broker's outbox (RabbitMQ; ``Broker.relay``)."""
        self._store = store
        self._admission = admission
        self._enqueue = enqueue
        self._cut_off = cut_off
        self._broker_backlog = broker_backlog
        self._relay = relay
        self._lease_seconds = lease_seconds
        self._interval = interval
        self._next_lost_check = 0.0
        self._periodic = Periodic("sweeper", interval, lambda: len(self.tick()) >= CLAIM_BATCH)

    def tick(self) -> list[str]:
        """Claim and enqueue what is due now; return the ids enqueued (admitted ones included)."""
        self._cancel_past_deadlines()
        relayed = self._relay_outbox()
        ready = self._store.claim_due_retries(CLAIM_BATCH)
        ids = self._store.claim_expired_leases(self._lease_seconds, CLAIM_BATCH)
        if time.monotonic() >= self._next_lost_check:
            self._next_lost_check = time.monotonic() + self._lease_seconds / 3
            if self._backlog() == 0:
                ids += self._store.claim_lost_messages(older_than=self._lease_seconds, limit=CLAIM_BATCH)
        self._enqueue(ids)
        admitted = self._admission.admit()
        if ids or ready or admitted or relayed:
            log.info(
                "sweeper: %d due retries ready, %d admitted, %d recovered, %d relayed from the outbox",
                len(ready),
                len(admitted),
                len(ids),
                relayed,
            )
        return ids + admitted

    def _relay_outbox(self) -> int:
        try:
            return self._relay()
        except BrokerUnavailable as exc:  # the entries stay in the outbox; the next tick tries again
            log.warning("sweeper: the outbox could not be relayed: %s", exc.message)
            return 0

    def _backlog(self) -> int | None:
        """The broker's backlog; None when the broker cannot tell (then nothing is taken for lost)."""
        try:
            return self._broker_backlog()
        except BrokerUnavailable as exc:
            log.warning("sweeper: the broker's queue could not be read: %s", exc.message)
            return None

    def _cancel_past_deadlines(self) -> None:
        for task_id in self._store.claim_past_deadlines(CLAIM_BATCH):
            try:
                self._store.cancel(task_id, error=DEADLINE_EXCEEDED)
            except (InvalidTransition, NotFound):  # final meanwhile, or gone
                continue
            self._cut_off(task_id)
            log.info("task %s: canceled, past its Cancel-After deadline", task_id)

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
