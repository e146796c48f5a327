"""Accepting one job (or a batch of them: ``services/batches.py``): validate the body, check its
webhook, honour its ``Idempotency-Key``, then store the task (every task of the batch), its payload, its
idempotency record and its broker message in one Redis transaction.

The API's view only reads HTTP (the body, two headers) and writes the ``Accepted`` it gets back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services import metrics
from services.batches import batch_links, new_batch, new_batch_id
from services.broker import Broker
from services.config import Config
from services.errors import RequestError
from services.idempotency import Claim, IdempotencyStore, Replay
from services.records import TaskRecord, WebhookSubscription
from services.serialization import dumps_bytes
from services.store import JobStore, NewTask
from services.task_view import task_links
from services.validation import Limits, in_batch_request, parse_json_body, validate_batch, validate_submission
from services.webhooks.service import WebhookService


@dataclass(frozen=True)
class Accepted:
    """The answer to a submission: 202 and the new task's summary, or the first answer replayed."""

    status: int
    body: dict[str, Any]
    replayed: bool = False

    @property
    def location(self) -> str:
        return str(self.body["links"]["self"])


class SubmissionService:
    def __init__(
        self,
        config: Config,
        store: JobStore,
        idempotency: IdempotencyStore,
        webhooks: WebhookService,
        broker: Broker,
    ) -> None:
        self._config = config
        self._broker = broker
        self._store = store
        self._idempotency = idempotency
        self._webhooks = webhooks
        self._limits = Limits(
            max_input_images=config.max_input_images,
            max_inline_image_bytes=config.max_inline_image_bytes,
            allowed_models=config.allowed_models,
        )

    def submit(
        self, raw: bytes, *, idempotency_key: str | None, tenant: str, cancel_after: float | None = None
    ) -> Accepted:
        """Accept the body ``raw`` from ``tenant`` (its idempotency keys are its own); ``cancel_after``:
        seconds after which it is canceled if not final (the ``Cancel-After`` header)."""
        return self._idempotent(
            raw, idempotency_key, tenant, lambda claim: self._accept(raw, tenant, claim, cancel_after)
        )

    def submit_batch(
        self, raw: bytes, *, idempotency_key: str | None, tenant: str, cancel_after: float | None = None
    ) -> Accepted:
        """Accept a batch (``services/batches.py``): all its requests valid, then all stored, or none;
        ``cancel_after`` applies to each of its tasks."""
        return self._idempotent(
            raw, idempotency_key, tenant, lambda claim: self._accept_batch(raw, tenant, claim, cancel_after)
        )

    def _idempotent(
        self, raw: bytes, idempotency_key: str | None, tenant: str, accept: Callable[[Claim | None], Accepted]
    ) -> Accepted:
        if idempotency_key is None:
            return accept(None)
        claim = self._idempotency.claim(idempotency_key, scope=tenant, body=raw)
        if isinstance(claim, Replay):
            return Accepted(claim.status, claim.body, replayed=True)
        try:
            return accept(claim)
        except RequestError:
            # Rejected before anything was stored (a bad body, a tenant's limit): the client may fix the
            # body, or wait, and reuse the key. (On a store error the key is kept: the task may exist;
            # the pending record expires on its own.)
            self._idempotency.release(claim)
            raise

    def _accept(self, raw: bytes, tenant: str, claim: Claim | None, cancel_after: float | None) -> Accepted:
        """Validate, store and enqueue one submission.

        The tenant's limits are checked and the task, its payload and its broker message (or its place
        in the tenant's ready set) are written in one script (one round trip): stored means enqueued or
        waiting for admission (``services/admission.py``). On RabbitMQ the script writes the task's id
        into the outbox instead, published right after it (``services/broker.py``). (A message the
        broker loses later is found by the sweeper: a queued task whose message is missing.)
        """
        submission = validate_submission(parse_json_body(raw), self._limits)
        webhook = self._webhooks.subscription(submission.webhook_url, submission.webhook_events)
        task = self._store.create(
            model=submission.model,
            payload=dumps_bytes(submission.upstream_body),
            metadata=submission.metadata,
            webhook=webhook,
            tenant=tenant,
            priority=submission.priority,
            cancel_after=cancel_after,
            also_set=(lambda tasks: claim.done_record(202, self._summary(tasks[0]))) if claim else None,
            message=self._broker.message,
            sent=self._broker.after_create,
        )
        metrics.task_submitted()
        return Accepted(202, self._summary(task))

    def _accept_batch(
        self, raw: bytes, tenant: str, claim: Claim | None, cancel_after: float | None
    ) -> Accepted:
        """Validate every request of a batch, then store the batch and all its tasks in one script."""
        batch = validate_batch(parse_json_body(raw), self._limits)
        batch_webhook = self._webhooks.subscription(batch.webhook_url, batch.webhook_events)
        task_events = [
            event.removeprefix("task.") for event in batch.webhook_events if event.startswith("task.")
        ]
        tasks_webhook: WebhookSubscription | None = None
        if batch_webhook is not None and task_events:
            tasks_webhook = {"url": batch_webhook["url"], "events": task_events}
        new_tasks = []
        for index, submission in enumerate(batch.submissions):
            with in_batch_request(index):
                webhook = self._webhooks.subscription(submission.webhook_url, submission.webhook_events)
            new_tasks.append(
                NewTask(
                    model=submission.model,
                    payload=dumps_bytes(submission.upstream_body),
                    metadata=submission.metadata,
                    webhook=webhook or tasks_webhook,
                    priority=submission.priority,
                )
            )
        batch_id = new_batch_id()

        def done_record(tasks: list[TaskRecord]) -> tuple[str, str, int, str]:
            assert claim is not None
            return claim.done_record(202, self._batch_summary(batch_id, tasks))

        tasks = self._store.create_many(
            new_tasks,
            tenant=tenant,
            cancel_after=cancel_after,
            also_set=done_record if claim else None,
            message=self._broker.message,
            sent=self._broker.after_create,
            batch=new_batch(batch_id, tenant, batch.metadata, batch_webhook),
        )
        metrics.task_submitted(len(tasks))
        return Accepted(202, self._batch_summary(batch_id, tasks))

    def _summary(self, task: TaskRecord) -> dict[str, Any]:
        return {
            "id": task["id"],
            "status": task["status"],
            "created_at": task["created_at"],
            "links": task_links(task["id"], self._config.public_base_url),
        }

    def _batch_summary(self, batch_id: str, tasks: list[TaskRecord]) -> dict[str, Any]:
        return {
            "id": batch_id,
            "object": "batch",
            "status": "in_progress",
            "created_at": tasks[0]["created_at"],
            "task_ids": [task["id"] for task in tasks],
            "links": batch_links(batch_id, self._config.public_base_url),
        }
