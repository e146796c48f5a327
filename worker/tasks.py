"""The Celery tasks: each reads its message and makes one call on ``services``."""

from __future__ import annotations

import logging

from celery import Task, shared_task

from services.errors import StoreUnavailable
from services.queue import DELIVER_WEBHOOK_TASK, GENERATE_TASK
from worker.steps import runtime_of

log = logging.getLogger(__name__)


@shared_task(name=GENERATE_TASK, bind=True)  # type: ignore[untyped-decorator]  # celery is untyped
def generate(self: Task, task_id: str) -> None:
    try:
        runtime_of(self.app).runner.run(task_id)
    except StoreUnavailable as exc:
        # Nothing could be recorded; the sweeper runs the task again once the store is back.
        log.warning("task %s: store unavailable (%s); left to the sweeper", task_id, exc.message)


@shared_task(name=DELIVER_WEBHOOK_TASK, bind=True)  # type: ignore[untyped-decorator]  # celery is untyped
def deliver_webhook(self: Task, event_id: str, claim: str) -> None:
    """Run in workers that consume the ``webhooks`` queue, apart from the generation workers
    (``celery -A worker.main worker -Q webhooks``), so that receivers that answer slowly never hold a
    slot a generation job could use."""
    try:
        runtime_of(self.app).webhooks.deliver(event_id, claim)
    except StoreUnavailable as exc:
        # The event stays due under its lease; a dispatcher claims it again once the lease expires.
        log.warning("webhook %s: store unavailable (%s); retried after its lease", event_id, exc.message)
