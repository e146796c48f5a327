"""Listing a tenant's tasks: ``GET /v1/tasks``, newest first, from an index, never a scan of Redis.

The store keeps two indexes per tenant in the same atomic steps that write its tasks
(``services/store.py``): every task by creation time (``{p}:t:{t}:tasks``) and the tasks of each status
(``{p}:t:{t}:status:{s}``); a batch keeps one of its tasks (``{p}:batch:{id}:tasks``). A page reads the
index that fits the filters (the batch's, else the status's, else all), from the cursor down, then the
records themselves, and keeps those that pass the other filters (creation time is the index's score;
``metadata.<key>=<value>`` and the status are checked on the records, and that the caller owns them).

The cursor is the (creation, id) of the last task examined: a page starts strictly after it in the
index's order (score descending, then id descending), so tasks created meanwhile, which sort before it,
never appear in later pages, and no task is skipped or repeated. A page examines at most
``SCAN_BUDGET`` index entries: with a filter that few tasks match, it may hold fewer than ``limit``
tasks and still have a ``next_cursor``. An entry whose record expired is dropped from the index.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis

from services import clock
from services.errors import InvalidRequest
from services.keys import Keys
from services.records import TaskRecord
from services.redis_errors import mapped_redis_errors
from services.tenants import tenant_of

MAX_LIMIT = 100
SCAN_BUDGET = 1000  # index entries a page examines at most
_BATCH = 200


@dataclass(frozen=True)
class Page:
    tasks: list[TaskRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class Query:
    """What a listing asks for; times are epoch ms (inclusive after, exclusive before)."""

    status: str | None = None
    created_after: int | None = None
    created_before: int | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    batch_id: str | None = None
    cursor: str | None = None
    limit: int = 20


STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
MAX_METADATA_FILTERS = 10
MAX_METADATA_KEY = 90  # characters of <key> in metadata.<key>=<value>
MAX_METADATA_VALUE = 1000
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


def query_from_params(params: Iterable[tuple[str, str]]) -> Query:
    """The query of ``GET /v1/tasks``'s parameters, every (name, value) of the query string (a repeated
    name as often as it is given); 400 naming the parameter for anything else. A parameter given twice
    is refused rather than read once: which value was meant is the client's to say."""
    metadata: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    given: set[str] = set()
    for name, value in params:
        if name in given:  # its first use was accepted: a known name, or a short metadata.<key>
            raise InvalidRequest(f"{name} is given more than once; give each parameter once", field=name)
        given.add(name)
        if name.startswith("metadata.") and len(name) > len("metadata."):
            key = name.removeprefix("metadata.")
            if (
                len(metadata) == MAX_METADATA_FILTERS
                or len(key) > MAX_METADATA_KEY
                or len(value) > MAX_METADATA_VALUE
            ):
                raise InvalidRequest(
                    f"at most {MAX_METADATA_FILTERS} metadata filters, each key of at most "
                    f"{MAX_METADATA_KEY} characters and each value of at most {MAX_METADATA_VALUE}",
                    field=name[: len("metadata.") + MAX_METADATA_KEY + 1],
                )
            metadata.append((key, value))
        elif name == "status":
            if value not in STATUSES:
                raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", field=name)
            values["status"] = value
        elif name in ("created_after", "created_before"):
            try:
                values[name] = clock.epoch_ms(value)
            except (ValueError, OverflowError):
                raise InvalidRequest(
                    f"{name} must be an ISO 8601 time, e.g. 2026-12-02T10:00:00Z", field=name
                ) from None
        elif name == "batch_id":
            if not BATCH_ID.fullmatch(value):
                raise InvalidRequest("batch_id must be a batch's id, e.g. batch_0f3c...", field=name)
            values["batch_id"] = value
        elif name == "limit":
            if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
                raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}", field=name)
            values["limit"] = int(value)
        elif name == "cursor":
            decode_cursor(value)
            values["cursor"] = value
        else:
            raise InvalidRequest(f"unknown parameter {name[:64]!r}", field=name[:64])
    return Query(metadata=tuple(metadata), **values)


def encode_cursor(score: int, task_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([score, task_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        score, task_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(score, int) or not isinstance(task_id, str):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("cursor is not one this server handed out", field="cursor") from None
    return score, task_id


def _matches(task: TaskRecord, query: Query) -> bool:
    """The record passes the filters the index did not apply: its status (which may have changed since
    the index was read), and each ``metadata.<key>=<value>``: the task's metadata has that key, and its
    value, as text, is that."""
    if query.status is not None and task["status"] != query.status:
        return False
    own = task["metadata"] or {}
    for key, value in query.metadata:
        if key not in own:
            return False
        found = own[key]
        text = found if isinstance(found, str) else json.dumps(found)
        if text != value:
            return False
    return True


class TaskList:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    def page(self, tenant: str, query: Query) -> Page:
        keys = self._keys
        if query.batch_id:
            index = keys.batch_tasks(query.batch_id)
        elif query.status:
            index = keys.tenant_status(tenant, query.status)
        else:
            index = keys.tenant_tasks(tenant)
        after = decode_cursor(query.cursor) if query.cursor else None
        found: list[TaskRecord] = []
        gone: list[str] = []
        last: tuple[int, str] | None = None
        examined = 0
        with mapped_redis_errors():
            for task_id, score, raw in self._entries(index, query, after):
                last = (score, task_id)
                examined += 1
                if raw is None:
                    gone.append(task_id)
                else:
                    task: TaskRecord = json.loads(raw)
                    if tenant_of(task) == tenant and _matches(task, query):
                        found.append(task)
                if len(found) == query.limit or examined == SCAN_BUDGET:
                    break
            else:
                last = None  # the index ended: no next page
            if gone:
                self._redis.zrem(index, *gone)
        return Page(found, encode_cursor(*last) if last is not None else None)

    def _entries(
        self, index: str, query: Query, after: tuple[int, str] | None
    ) -> Iterator[tuple[str, int, bytes | None]]:
        """(id, creation ms, record) of the index's entries after the cursor, newest first; their
        records read a batch at a time."""
        top: int | str = "+inf" if query.created_before is None else f"({query.created_before}"
        if after is not None:
            top = after[0]
        bottom: int | str = "-inf" if query.created_after is None else query.created_after
        offset = 0
        # Without a metadata filter the index applies every filter, so the page is its first ``limit``
        # entries (and the cursor's own, read again): read just those first; more only if some were
        # gone. With one, most records read are dropped: a batch at a time.
        size = _BATCH if query.metadata else query.limit + (1 if after is not None else 0)
        while True:
            entries = cast(
                "list[tuple[bytes, float]]",
                self._redis.zrevrangebyscore(index, top, bottom, start=offset, num=size, withscores=True),
            )
            offset += len(entries)
            batch = [(member.decode(), int(score)) for member, score in entries]
            if after is not None:  # the cursor's own score: only the ids after it (descending)
                batch = [(i, s) for i, s in batch if s < after[0] or i < after[1]]
            records = (
                cast("list[bytes | None]", self._redis.mget([self._keys.task(i) for i, _ in batch]))
                if batch
                else []
            )
            for (task_id, score), raw in zip(batch, records, strict=True):
                yield task_id, score, raw
            if len(entries) < size:
                return
            size = _BATCH
