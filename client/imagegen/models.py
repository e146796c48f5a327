"""What the server answers, as typed values: a ``Task`` and what it holds, a ``Page`` of tasks.

Each ``from_json`` takes the server's JSON as it is; fields the SDK does not know yet stay in ``raw``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED})


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None


@dataclass(frozen=True)
class Output:
    """One stored image. ``url`` is presigned and expires; ``Client.download`` asks for a fresh one."""

    index: int
    mime_type: str
    bytes: int
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    url: str | None = None
    bucket: str | None = None
    key: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Output:
        return cls(
            index=data["index"],
            mime_type=data.get("mime_type", "application/octet-stream"),
            bytes=data.get("bytes", 0),
            width=data.get("width"),
            height=data.get("height"),
            sha256=data.get("sha256"),
            url=data.get("url"),
            bucket=data.get("bucket"),
            key=data.get("key"),
        )


@dataclass(frozen=True)
class TaskError:
    """Why a task failed: ``code`` is machine-readable (README: "How a job fails")."""

    code: str
    message: str
    retryable: bool = False
    upstream_status: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskError:
        return cls(
            code=data.get("code", "unknown"),
            message=data.get("message", ""),
            retryable=bool(data.get("retryable", False)),
            upstream_status=data.get("upstream_status"),
        )


@dataclass(frozen=True)
class Attempt:
    number: int
    outcome: str | None = None  # None while it runs
    upstream_status: int | None = None
    error_code: str | None = None
    duration_ms: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attempt:
        return cls(
            number=data["number"],
            outcome=data.get("outcome"),
            upstream_status=data.get("upstream_status"),
            error_code=data.get("error_code"),
            duration_ms=data.get("duration_ms"),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
        )


@dataclass(frozen=True)
class Task:
    """A task as the server last showed it. A submission's answer has only ``id``, ``status``,
    ``created_at`` and ``links``; ``Client.get`` or ``Client.wait`` bring the rest."""

    id: str
    status: TaskStatus
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    model: str | None = None
    outputs: list[Output] = field(default_factory=list)
    error: TaskError | None = None
    attempts: list[Attempt] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    queue_position: int | None = None  # shown by servers that know it, for a queued task
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Task:
        error = data.get("error")
        return cls(
            id=data["id"],
            status=TaskStatus(data["status"]),
            created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            model=data.get("model"),
            outputs=[Output.from_json(item) for item in data.get("outputs") or []],
            error=TaskError.from_json(error) if error else None,
            attempts=[Attempt.from_json(item) for item in data.get("attempts") or []],
            text=list(data.get("text") or []),
            usage=data.get("usage"),
            metadata=data.get("metadata"),
            queue_position=data.get("queue_position"),
            raw=dict(data),
        )

    @property
    def done(self) -> bool:
        """Final: succeeded, failed or canceled."""
        return self.status in FINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status is TaskStatus.SUCCEEDED


@dataclass(frozen=True)
class Page:
    """One page of ``GET /v1/tasks``; iterating it gives its tasks. ``next_cursor`` is None on the last."""

    data: list[Task]
    next_cursor: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Page:
        return cls(
            data=[Task.from_json(item) for item in data.get("data") or []],
            next_cursor=data.get("next_cursor") or None,
        )

    def __iter__(self) -> Iterator[Task]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)
