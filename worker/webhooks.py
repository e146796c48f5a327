"""The webhook delivery task and its dispatcher thread, in workers that consume the ``webhooks`` queue.

Run such a worker apart from the generation workers (``celery -A worker.main worker -Q webhooks``), so
that receivers that answer slowly never hold a slot a generation job could use.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_ready, worker_shutdown

from services.errors import StoreUnavailable
from services.queue import DELIVER_WEBHOOK_TASK, WEBHOOK_QUEUE, enqueue_webhook
from services.webhooks import WebhookDispatcher
from worker.tasks import runtime

log = logging.getLogger(__name__)

_dispatcher: WebhookDispatcher | None = None


@shared_task(name=DELIVER_WEBHOOK_TASK, bind=True)
def deliver_webhook(self: Task, event_id: str, claim: str) -> None:
    try:
        runtime(self.app).webhooks.deliver(event_id, claim)
    except StoreUnavailable as exc:
        # The event stays due under its lease; a dispatcher claims it again once the lease expires.
        log.warning("webhook %s: store unavailable (%s); retried after its lease", event_id, exc.message)


@worker_ready.connect
def start_webhook_dispatcher(sender: Any, **_: Any) -> None:
    global _dispatcher
    app = sender.app
    if WEBHOOK_QUEUE not in app.amqp.queues.consume_from:
        return
    rt = runtime(app)
    if rt.config.webhook_signing_secret is None:
        log.error(
            "WEBHOOK_SIGNING_SECRET is unset: this worker delivers NO webhooks (they wait in the outbox "
            "until a worker with the secret runs)"
        )
        return
    _dispatcher = WebhookDispatcher(
        rt.webhooks.outbox,
        lambda event_id, claim: enqueue_webhook(app, event_id, claim),
        lambda: rt.redis.llen(WEBHOOK_QUEUE),
        lease_seconds=rt.config.webhook_lease_seconds,
        interval=rt.config.webhook_dispatch_interval,
    )
    _dispatcher.start()
    # one line per attempt comes from services.webhooks (without the URL, which may hold a token)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    log.info("webhook dispatcher started (every %.0f ms)", rt.config.webhook_dispatch_interval * 1000)


@worker_shutdown.connect
def stop_webhook_dispatcher(**_: Any) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()
