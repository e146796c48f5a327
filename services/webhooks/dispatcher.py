"""The dispatcher: claims due webhook events and sends their deliveries to the ``webhooks`` queue."""

from __future__ import annotations

import logging
from collections.abc import Callable

from services.logs import task_scope
from services.periodic import Periodic
from services.redis_errors import mapped_redis_errors
from services.webhooks.outbox import WebhookOutbox, event_task_id

log = logging.getLogger(__name__)


class WebhookDispatcher:
    """Claims due webhook events and sends their deliveries to the ``webhooks`` queue.

    One runs in each worker that consumes that queue; any number are safe, since a claim is atomic.
    It ticks every ``WEBHOOK_DISPATCH_INTERVAL`` (50 ms), and again at once while it finds a full batch.
    It claims nothing while the queue already holds ``max_backlog`` messages: a claimed event must start
    within its lease, or it is claimed (and sent) again, so after an outage it drains the outbox at the
    pace of the workers instead of flooding the queue.
    """

    def __init__(
        self,
        outbox: WebhookOutbox,
        enqueue: Callable[[str, str], None],
        backlog: Callable[[], int],
        *,
        lease_seconds: float,
        interval: float,
        batch: int = 200,
        max_backlog: int = 400,
    ) -> None:
        self._outbox = outbox
        self._enqueue = enqueue
        self._backlog = backlog
        self._lease_seconds = lease_seconds
        self.interval = interval
        self._batch = batch
        self._max_backlog = max_backlog
        self._periodic = Periodic("webhook-dispatcher", interval, lambda: self.tick() >= batch)

    def tick(self) -> int:
        with mapped_redis_errors():
            room = self._max_backlog - self._backlog()
        if room <= 0:
            return 0
        claimed = self._outbox.claim_due(self._lease_seconds, min(self._batch, room))
        for event_id, claim in claimed:
            try:
                self._enqueue(event_id, claim)
            except Exception as exc:  # the lease expires and the event is claimed again
                with task_scope(event_task_id(event_id)):
                    log.warning("webhook %s: enqueue failed (%s); retried after its lease", event_id, exc)
        return len(claimed)

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
