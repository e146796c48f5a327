"""What the API and the workers do with webhooks: subscribe at submit, deliver one attempt, redeliver.

A delivery, step by step (a worker killed between any two steps loses nothing):

1. The dispatcher (``dispatcher.py``, a thread in each worker consuming the ``webhooks`` queue) claims
   due events with one script: their score moves a lease ahead (``WEBHOOK_LEASE_SECONDS``) and a fresh
   claim token is recorded. It sends ``imagegen.deliver_webhook(event_id, claim)`` to the queue.
2. ``deliver`` starts the attempt atomically, only if its claim is still current (a message redelivered
   by the broker long after, or one superseded by a redeliver, does nothing): ``attempts`` + 1 and the
   lease renewed from now.
3. One POST, signed with the task's tenant's secrets (``services/webhook_secrets.py``), through the
   address guard (``services/netguard.py``), no redirects, ``WEBHOOK_TIMEOUT`` for connect and read
   (``sender.py``).
4. One script records the attempt in the log and either removes the event from ``due`` (delivered,
   410 Gone, refused address, schedule exhausted) or sets its next due time.

A worker killed between 1 and 4 leaves the event in ``due`` with its lease as score: when the lease
expires, a dispatcher claims it again. Deliveries are at least once; receivers de-duplicate by
``webhook-id``, which is the event's id on every attempt.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
from typing import Any

import redis

from services import clock, metrics
from services.batches import batch_view, load_batch
from services.config import Config
from services.errors import NoWebhook
from services.keys import Keys
from services.logs import task_scope
from services.netguard import Resolver, check_webhook_url
from services.records import TaskRecord, WebhookSubscription
from services.serialization import dumps_bytes
from services.storage import Storage
from services.task_view import task_view
from services.tenants import tenant_of
from services.webhook_secrets import WebhookSecrets
from services.webhooks.outbox import DEFAULT_EVENTS, Started, WebhookOutbox, event_status
from services.webhooks.sender import AttemptResult, WebhookSender

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_SECONDS = 86400.0


class WebhookService:
    """What the API and the workers do with webhooks."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        client: redis.Redis,
        keys: Keys,
        *,
        resolver: Resolver = socket.getaddrinfo,
    ) -> None:
        self.config = config
        self.outbox = WebhookOutbox(client, keys, retention=config.task_retention_days * 86400)
        self.secrets = WebhookSecrets(
            client,
            keys,
            grace_seconds=config.webhook_secret_grace,
            default_secret=config.webhook_signing_secret,
        )
        self._storage = storage
        self._redis = client
        self._keys = keys
        self._resolver = resolver
        self._sender: WebhookSender | None = None
        self._lock = threading.Lock()

    @property
    def sender(self) -> WebhookSender:
        with self._lock:
            if self._sender is None:
                self._sender = WebhookSender(self.config, resolver=self._resolver)
            return self._sender

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()

    # API --------------------------------------------------------------------------------------------
    def subscription(self, url: str | None, events: tuple[str, ...] | None) -> WebhookSubscription | None:
        """The ``webhook`` a submission asks for, checked (400 if refused); None without a URL."""
        if url is None:
            return None
        check_webhook_url(
            url, allow_http=self.config.webhook_allow_http, allow_private=self.config.webhook_allow_private
        )
        return {"url": url, "events": list(events or DEFAULT_EVENTS)}

    def deliveries(self, task: TaskRecord) -> list[dict[str, Any]] | None:
        return self.outbox.deliveries(task["id"]) if task["webhook"] else None

    def redeliver(self, task: TaskRecord) -> dict[str, Any]:
        """Send the task's latest event again (a given-up one gets a fresh schedule)."""
        latest = self.outbox.latest_event_id(task)
        if latest is None or not self.outbox.redeliver(latest):
            reason = "has no webhook" if not task["webhook"] else "has no webhook event yet"
            raise NoWebhook(f"task {task['id']} {reason}")
        event = f"task.{event_status(latest)}"
        return {"task_id": task["id"], "webhook_id": latest, "event": event, "status": "pending"}

    # worker -----------------------------------------------------------------------------------------
    def deliver(self, event_id: str, claim: str) -> str | None:
        """One delivery attempt of a claimed event; its outcome, or None when there was nothing to do."""
        started = self.outbox.begin(event_id, claim, self.config.webhook_lease_seconds)
        if started is None:
            return None
        with task_scope(_subject(started.event), _tenant(started.event)):
            return self._attempt(event_id, claim, started)

    def _attempt(self, event_id: str, claim: str, started: Started) -> str:
        event = started.event
        attempted_at = clock.now_iso()
        try:
            url, body = self.payload(event)
            signing = self.secrets.signing_secrets(_tenant(event))
            result = self.sender.send(url, event["id"], body, signing)
        except Exception as exc:  # a bug must not lose the event: record it and retry on schedule
            log.exception("webhook %s: attempt %d failed unexpectedly", event_id, started.attempt)
            result = AttemptResult(None, f"internal error: {type(exc).__name__}", 0)
        outcome, next_due = self._next_step(result, started.round_attempt)
        entry = {
            "webhook_id": event["id"],
            "event": event["type"],
            "attempt": started.attempt,
            "attempted_at": attempted_at,
            "status_code": result.status_code,
            "error": result.error,
            "duration_ms": result.duration_ms,
            "outcome": outcome,
            "next_retry_at": clock.iso_from_ms(next_due) if next_due is not None else None,
        }
        self.outbox.finish(
            event_id, _subject(event), claim, entry, next_due_ms=next_due, final_status=outcome
        )
        metrics.webhook_delivery(outcome)
        level = logging.INFO if outcome in ("delivered", "failed") else logging.WARNING
        log.log(
            level,
            "webhook %s attempt %d: %s (%s, %d ms)",
            event_id,
            started.attempt,
            outcome,
            result.status_code if result.status_code is not None else result.error,
            result.duration_ms,
        )
        return outcome

    def payload(self, event: dict[str, Any]) -> tuple[str, bytes]:
        """Where the event goes, and ``{"type", "timestamp", "data"}``: data being the task as
        ``GET /v1/tasks/{id}`` shows it (as it was when the event happened) with freshly signed output
        URLs, or the batch as ``GET /v1/batches/{id}`` shows it (final since the event)."""
        base_url = self.config.public_base_url
        if "batch_id" in event:
            batch = load_batch(self._redis, self._keys, event["batch_id"])
            webhook = batch.doc["webhook"] if batch is not None else None
            if batch is None or webhook is None:
                raise NoWebhook(f"batch {event['batch_id']} is gone")
            data = batch_view(batch, base_url=base_url, deliveries=self.outbox.deliveries(batch.id))
        else:
            snapshot: TaskRecord = event["task"]
            webhook = snapshot["webhook"]
            assert webhook is not None  # an event is written only for a task with a webhook
            deliveries = self.outbox.deliveries(snapshot["id"])
            data = task_view(snapshot, self._storage, base_url=base_url, deliveries=deliveries)
        document = {"type": event["type"], "timestamp": event["timestamp"], "data": data}
        return str(webhook["url"]), dumps_bytes(document)

    def _next_step(self, result: AttemptResult, round_attempt: int) -> tuple[str, int | None]:
        """The attempt's outcome and, when it is to be retried, when (epoch ms)."""
        if result.delivered:
            return "delivered", None
        if result.status_code == 410:
            return "gone", None
        if result.refused:
            return "refused", None
        schedule = self.config.webhook_retry_schedule
        if round_attempt >= len(schedule):
            return "given_up", None
        delay = schedule[round_attempt] * random.uniform(0.9, 1.1)
        if result.retry_after is not None:
            delay = max(delay, min(result.retry_after, MAX_RETRY_AFTER_SECONDS))
        return "failed", clock.now_ms() + round(delay * 1000)


def _subject(event: dict[str, Any]) -> str:
    """The id of what the event is about: its task, or its batch."""
    return str(event["batch_id"] if "batch_id" in event else event["task_id"])


def _tenant(event: dict[str, Any]) -> str:
    return str(event["tenant"]) if "batch_id" in event else tenant_of(event["task"])
