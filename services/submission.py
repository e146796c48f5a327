"""Accepting one job: validate the body, check its webhook, honour its ``Idempotency-Key``, then store the
task, its payload, its idempotency record and its broker message in one Redis transaction.

The API's view only reads HTTP (the body, two headers) and writes the ``Accepted`` it gets back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services import metrics
from services.config import Config
from services.errors import RequestError
from services.idempotency import Claim, IdempotencyStore, Replay
from services.queue import generation_message
from services.records import TaskRecord
from services.serialization import dumps_bytes
from services.store import JobStore
from services.task_view import task_links
from services.validation import Limits, parse_json_body, validate_submission
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
        self, config: Config, store: JobStore, idempotency: IdempotencyStore, webhooks: WebhookService
    ) -> None:
        self._config = config
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
        if idempotency_key is None:
            return self._accept(raw, tenant, None, cancel_after)
        claim = self._idempotency.claim(idempotency_key, scope=tenant, body=raw)
        if isinstance(claim, Replay):
            return Accepted(claim.status, claim.body, replayed=True)
        try:
            return self._accept(raw, tenant, claim, cancel_after)
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
        waiting for admission (``services/admission.py``). (A message the broker loses later is found by
        the sweeper: a queued task whose message is missing.)
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
            also_set=(lambda task: claim.done_record(202, self._summary(task))) if claim else None,
            message=generation_message,
        )
        metrics.task_submitted()
        return Accepted(202, self._summary(task))

    def _summary(self, task: TaskRecord) -> dict[str, Any]:
        return {
            "id": task["id"],
            "status": task["status"],
            "created_at": task["created_at"],
            "links": task_links(task["id"], self._config.public_base_url),
        }
