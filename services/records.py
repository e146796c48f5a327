"""The shapes of what the store keeps: a task's record and the records inside it.

These are the JSON documents under ``{p}:task:{id}`` (``services/keys.py``), typed from the store to the
view. Timestamps are ISO-8601 UTC text (``services/clock.py``).
"""

from __future__ import annotations

from typing import Any, TypedDict


class AttemptRecord(TypedDict):
    number: int
    started_at: str
    finished_at: str | None
    outcome: str | None  # succeeded, failed, retry, worker_lost, canceled; None while it runs
    upstream_status: int | None
    error_code: str | None
    duration_ms: int | None
    worker: str  # host:pid:thread of the worker that ran it (not shown to clients)


class OutputRecord(TypedDict):
    index: int
    bucket: str
    key: str
    mime_type: str
    bytes: int
    width: int | None
    height: int | None
    sha256: str


class ErrorRecord(TypedDict):
    code: str
    message: str
    retryable: bool
    upstream_status: int | None


class WebhookSubscription(TypedDict):
    url: str
    events: list[str]


class TaskRecord(TypedDict):
    id: str
    tenant: str  # who owns it (``services/tenants.py``); not shown to clients
    batch_id: str | None  # the batch it was submitted in (``services/batches.py``); absent in older records
    priority: str  # high, normal, low: its order among its tenant's waiting tasks
    deadline_at: str | None  # Cancel-After: canceled (deadline_exceeded) if not final by then
    status: str  # a TaskStatus value
    model: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    attempts: list[AttemptRecord]
    outputs: list[OutputRecord]
    text: list[str]
    usage: dict[str, Any] | None
    metadata: dict[str, Any] | None
    error: ErrorRecord | None
    next_attempt_at: str | None
    webhook: WebhookSubscription | None
