"""Batches: up to ``MAX_BATCH_REQUESTS`` tasks submitted in one request, all or none, and followed as one.

``SubmissionService.submit_batch`` validates every request first and stores the batch and all its tasks
in the one script that stores any task (``JobStore.create_many``): a batch exists with all its tasks
or not at all. Its record is the hash ``{p}:batch:{id}`` (``services/keys.py``): ``doc`` (what never
changes: id, tenant, created_at, metadata, webhook, task_ids), ``total``, a count per status, and
``completed_at`` (and ``last_finished_at``, which it becomes), ``cancel_requested_at``.

The counts move in the same compare-and-set as each change of one of its tasks' status
(``store_scripts.COMPARE_AND_SET``), so they are exact, and the change that finishes the last task
completes the batch in that same step: ``completed_at``, and its ``batch.completed`` webhook event in the
outbox, exactly once. A deleted task stays counted in its final status.

A batch's status: ``in_progress``, then ``completed`` once every task is final; after a cancel,
``canceling``, then ``canceled``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from services import clock
from services.errors import InvalidTransition, NotFound
from services.keys import Keys
from services.records import TaskRecord, WebhookSubscription
from services.redis_errors import mapped_redis_errors
from services.serialization import dumps
from services.store import FINAL_STATUSES, JobStore, NewBatch, TaskStatus
from services.webhooks.outbox import WebhookOutbox

STATUSES = tuple(status.value for status in TaskStatus)


def new_batch_id() -> str:
    """An unguessable id, told apart from a task's: ``batch_`` and 128 random bits."""
    return f"batch_{secrets.token_hex(16)}"


def batch_links(batch_id: str, base_url: str) -> dict[str, str]:
    base = base_url.rstrip("/")
    return {"self": f"{base}/v1/batches/{batch_id}", "tasks": f"{base}/v1/tasks?batch_id={batch_id}"}


def new_batch(
    batch_id: str, tenant: str, metadata: dict[str, Any] | None, webhook: WebhookSubscription | None
) -> NewBatch:
    """The batch's record, made from its tasks when the store creates them."""

    def fields(tasks: list[TaskRecord]) -> dict[str, str]:
        doc = {
            "id": batch_id,
            "tenant": tenant,
            "created_at": tasks[0]["created_at"],
            "metadata": metadata,
            "webhook": webhook,
            "task_ids": [task["id"] for task in tasks],
        }
        notify = webhook is not None and "batch.completed" in webhook["events"]
        return {"doc": dumps(doc), "total": str(len(tasks)), "queued": str(len(tasks))} | (
            {"notify": "1"} if notify else {}
        )

    return NewBatch(batch_id, fields)


@dataclass(frozen=True)
class Batch:
    """A batch as stored: its ``doc``, its counts by status, and when it completed / was canceled."""

    doc: dict[str, Any]
    counts: dict[str, int]
    completed_at: str | None
    cancel_requested_at: str | None

    @property
    def id(self) -> str:
        return str(self.doc["id"])

    @property
    def status(self) -> str:
        if self.cancel_requested_at is not None:
            return "canceled" if self.completed_at is not None else "canceling"
        return "completed" if self.completed_at is not None else "in_progress"

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> Batch:
        text = {key.decode(): value.decode() for key, value in fields.items()}
        counts = {"total": int(text["total"])} | {status: int(text.get(status, 0)) for status in STATUSES}
        return cls(json.loads(text["doc"]), counts, text.get("completed_at"), text.get("cancel_requested_at"))


def load_batch(client: redis.Redis, keys: Keys, batch_id: str) -> Batch | None:
    with mapped_redis_errors():
        fields = cast("dict[bytes, bytes]", client.hgetall(keys.batch(batch_id)))
    return Batch.from_hash(fields) if b"doc" in fields else None


def batch_view(
    batch: Batch, *, base_url: str, deliveries: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """What clients see of a batch (``GET /v1/batches/{id}``, and ``data`` of its webhook)."""
    doc = batch.doc
    webhook = doc["webhook"]
    return {
        "id": batch.id,
        "object": "batch",
        "status": batch.status,
        "created_at": doc["created_at"],
        "completed_at": batch.completed_at,
        "cancel_requested_at": batch.cancel_requested_at,
        "metadata": doc["metadata"],
        "counts": batch.counts,
        "task_ids": doc["task_ids"],
        "webhook": None if webhook is None else {**webhook, "deliveries": deliveries or []},
        "links": batch_links(batch.id, base_url),
    }


class Batches:
    """Reading and canceling batches; creating them is the store's (``JobStore.create_many``)."""

    def __init__(self, client: redis.Redis, keys: Keys, store: JobStore, outbox: WebhookOutbox) -> None:
        self._redis = client
        self._keys = keys
        self._store = store
        self._outbox = outbox

    def get(self, batch_id: str, *, tenant: str | None = None) -> Batch:
        """The batch; with ``tenant``, only if that tenant owns it (another's is not found either)."""
        batch = load_batch(self._redis, self._keys, batch_id)
        if batch is None or (tenant is not None and batch.doc["tenant"] != tenant):
            raise NotFound(f"no batch with id {batch_id!r}", field="id")
        return batch

    def view(self, batch: Batch, *, base_url: str) -> dict[str, Any]:
        deliveries = self._outbox.deliveries(batch.id) if batch.doc["webhook"] else None
        return batch_view(batch, base_url=base_url, deliveries=deliveries)

    def cancel(self, batch_id: str, *, tenant: str) -> tuple[Batch, list[str]]:
        """Cancel every unfinished task of the batch (its queued ones first, so that none of them starts
        meanwhile); return the batch and the ids of the tasks canceled, whose calls the caller cuts off.
        A completed batch cannot be canceled (409); canceling again carries on where a cancel that was
        cut short stopped."""
        batch = self.get(batch_id, tenant=tenant)
        if batch.completed_at is not None:
            raise InvalidTransition(f"batch {batch_id} is {batch.status}: every task is final")
        with mapped_redis_errors():
            self._redis.hsetnx(self._keys.batch(batch_id), "cancel_requested_at", clock.now_iso())
        canceled = []
        for task_id in self._unfinished(batch.doc["task_ids"]):
            try:
                self._store.cancel(task_id, tenant=tenant)
            except (InvalidTransition, NotFound):  # final meanwhile, or deleted
                continue
            canceled.append(task_id)
        return self.get(batch_id, tenant=tenant), canceled

    def _unfinished(self, task_ids: Sequence[str]) -> list[str]:
        """The ids of the tasks not final, queued ones first."""
        with mapped_redis_errors():
            records = cast("list[bytes | None]", self._redis.mget([self._keys.task(i) for i in task_ids]))
        statuses = [json.loads(raw)["status"] if raw is not None else None for raw in records]
        open_ = [(status, task_id) for task_id, status in zip(task_ids, statuses, strict=True) if status]
        open_ = [(status, task_id) for status, task_id in open_ if status not in FINAL_STATUSES]
        return [task_id for status, task_id in sorted(open_, key=lambda item: item[0] != "queued")]
