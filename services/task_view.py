"""What clients see of a task: the stored record with fresh download URLs, minus internal fields.

``GET /v1/tasks/{id}`` and webhook payloads both show exactly this.
"""

from __future__ import annotations

from typing import Any

from services.records import TaskRecord
from services.storage import Storage

_INTERNAL_TASK_FIELDS = ("tenant",)
_INTERNAL_ATTEMPT_FIELDS = ("worker",)


def task_view(
    task: TaskRecord, storage: Storage, *, base_url: str, deliveries: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """``deliveries``: the task's webhook delivery log, shown under ``webhook`` (url, events, deliveries)."""
    view: dict[str, Any] = {key: value for key, value in task.items() if key not in _INTERNAL_TASK_FIELDS}
    webhook = task["webhook"]
    view["webhook"] = None
    if webhook:
        view["webhook"] = {"url": webhook["url"], "events": webhook["events"], "deliveries": deliveries or []}
    view["outputs"] = [{**output, "url": storage.presigned_url(output["key"])} for output in task["outputs"]]
    view["attempts"] = [
        {key: value for key, value in attempt.items() if key not in _INTERNAL_ATTEMPT_FIELDS}
        for attempt in task["attempts"]
    ]
    view["queue_position"] = None  # read by GET /v1/tasks/{id} only (JobStore.queue_position)
    view["links"] = task_links(task["id"], base_url)
    return view


def task_links(task_id: str, base_url: str) -> dict[str, str]:
    return {"self": f"{base_url.rstrip('/')}/v1/tasks/{task_id}"}
