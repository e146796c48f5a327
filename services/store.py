"""The job store: task records and request payloads in Redis, and every state change of a task.

The keys and what they hold are drawn in ``services/keys.py``; the records' shapes are in
``services/records.py``; the Lua scripts are in ``services/store_scripts.py``.

Every change goes through ``_write``: read the document (or take the one the caller last wrote: a
lease carries it), let a pure function compute the next one (``_check`` enforces
``ALLOWED_TRANSITIONS``), and write it with one compare-and-set script, retrying on a fresh read if
another process changed the task in between. No other code writes a task. The same script applies, in
the same atomic step, what follows from the change (``_consequences``): the bookkeeping sets (active,
queued, delayed, running), the lease, the saved answer, the retention of a final task, the webhook
event the change causes (its format is the outbox's: ``services/webhooks/outbox.py``), and a change of
status's numbered event and its wake-up on pub/sub (``services/task_events.py``), so that a crash can
never split a state change from its bookkeeping.

A worker's writes that close its attempt (``succeed``, ``fail``, ``schedule_retry``) and the answer it
saves (``save_result``) are accepted only while that attempt is still the task's open attempt: the
compare-and-set makes the check and the write one atomic step. Another worker that took the task over
after the lease expired opened a new attempt, and a cancel closed it, so a stale worker's late write is
refused with ``LeaseLost`` (or ``InvalidTransition``) and changes nothing. (A lease that expired while
no other attempt started loses nothing: the answer it paid for is still recorded.)

    queued ──► running ──► succeeded
      ▲  │        │  └───► failed
      │  │        └──────► queued (a retry is scheduled)
      │  └───────────────► failed | canceled
      └── running ───────► running (redelivered after its lease expired: the lost attempt is closed)
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import redis

from services import clock, metrics
from services import store_scripts as scripts
from services.admission import ready_order
from services.errors import (
    IdempotencyConflict,
    InvalidTransition,
    JobError,
    LeaseLost,
    NotFound,
    TooManyRequests,
)
from services.keys import Keys
from services.lua import Script
from services.records import AttemptRecord, ErrorRecord, OutputRecord, TaskRecord, WebhookSubscription
from services.redis_errors import mapped_redis_errors
from services.replication import NO_REPLICA_ACK, ReplicaAck
from services.serialization import dumps
from services.tenants import DEFAULT_TENANT, TenantSettings, tenant_of
from services.usage import RETENTION_SECONDS as USAGE_RETENTION_SECONDS
from services.validation import WEBHOOK_EVENTS
from services.webhooks.outbox import OutboxEvent, batch_completed_event, event_for_change, event_id


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED})

ALLOWED_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset(
        {TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELED}
    ),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.RUNNING, TaskStatus.QUEUED, TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED}
    ),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELED: frozenset(),
}


# Without settings of its own, a tenant is limited only by the window (tests build stores this way).
NO_LIMITS = TenantSettings(max_concurrency=0, max_queued=0, rate_per_minute=0.0, weight=1.0)
# A task's entry in its tenant's index outlives the longest a task can be kept; stale ones are also
# dropped when a listing finds their record gone (services/task_list.py).
INDEX_SLACK_SECONDS = 7 * 86400
QUEUE_FULL_RETRY_AFTER = 5.0  # seconds: when some of a full queue is likely done; a hint, not a promise
DEADLINE_RECLAIM_MS = 5000  # a claimed deadline whose cancel did not happen is claimed again after this
DEADLINE_EXCEEDED = JobError("the task was not done by its Cancel-After deadline", code="deadline_exceeded")


def new_task_id() -> str:
    """An unguessable id: a random UUID4 (122 random bits)."""
    return str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))


@dataclass(frozen=True)
class Lease:
    """A running attempt's claim on its task; ``token`` proves who holds it.

    ``document`` is the task's record as the attempt wrote it: the attempt's closing change (succeed,
    fail, retry) compares against it directly instead of reading the record first, one round trip less;
    if the record changed meanwhile, the compare-and-set fails and the change is made on a fresh read.
    """

    task_id: str
    token: str
    seconds: float
    attempt: int  # the number of the attempt it opened: the one its holder may close
    document: str | None = field(default=None, compare=False, repr=False)

    @property
    def worker(self) -> str:
        """Who holds it: the attempt's ``worker`` (the token is that and a random part)."""
        return self.token.rsplit(":", 1)[0]


@dataclass(frozen=True)
class Attempt:
    """A started attempt and what it needs, read in the same round trip as the task: the request
    payload (None if it is missing) and the upstream answer an earlier attempt saved (usually None)."""

    task: TaskRecord
    lease: Lease
    payload: bytes | None
    saved_result: bytes | None


@dataclass(frozen=True)
class NewTask:
    """One task to create: what its submission asks for."""

    model: str
    payload: bytes
    metadata: dict[str, Any] | None
    webhook: WebhookSubscription | None = None
    priority: str = "normal"


@dataclass(frozen=True)
class NewBatch:
    """The batch new tasks belong to: its id, and its record's fields made from its tasks (the hash
    ``{p}:batch:{id}``, ``services/batches.py``)."""

    id: str
    fields: Callable[[list[TaskRecord]], dict[str, str]]


# Decides, when an attempt is about to start, that the task must fail instead (the job runner's policy:
# its attempts are used up); None lets it run.
GiveUp = Callable[[TaskRecord], JobError | None]


class _Change:
    """What a change writes besides the record, every key it touches declared (``COMPARE_AND_SET``)."""

    def __init__(self, task_key: str) -> None:
        self.keys = [task_key]
        self.absent: list[int] = []
        self.not_members: list[list[int | str]] = []
        self.writes: list[list[str | int]] = []
        self.batch: dict[str, str | int | bool] | None = None

    def _index(self, key: str) -> int:
        if key not in self.keys:
            self.keys.append(key)
        return self.keys.index(key) + 1  # Lua counts from 1

    def require_absent(self, key: str) -> None:
        self.absent.append(self._index(key))

    def require_not_member(self, key: str, member: str) -> None:
        """``member`` must not be in the sorted set ``key`` (else the change is not made, like a key
        that ``require_absent`` finds)."""
        self.not_members.append([self._index(key), member])

    def write(self, command: str, key: str, *args: str | int) -> None:
        self.writes.append([command, self._index(key), *(str(arg) for arg in args)])

    def count_in_batch(
        self, keys: Keys, task: TaskRecord, old_status: str, completion: OutboxEvent, retention: int
    ) -> None:
        """Move the task's batch's counts from ``old_status`` to its status; if that leaves none of the
        batch's tasks unfinished, complete the batch, kept ``retention`` s from then, with
        ``completion`` as its webhook event (``COMPARE_AND_SET``)."""
        batch_id = task["batch_id"]
        assert batch_id is not None
        self.batch = {
            "key": self._index(keys.batch(batch_id)),
            "tasks": self._index(keys.batch_tasks(batch_id)),
            "event": self._index(keys.webhook_event(completion.id)),
            "due": self._index(keys.webhooks_due),
            "from": old_status,
            "to": task["status"],
            "final": TaskStatus(task["status"]).is_final,
            "finished_at": task["finished_at"] or "",
            "event_id": completion.id,
            "document": completion.document,
            "now_ms": clock.now_ms(),
            "ttl": retention,
        }

    def encoded(self) -> str:
        change: dict[str, Any] = {"absent": self.absent, "writes": self.writes}
        if self.not_members:
            change["not_members"] = self.not_members
        if self.batch is not None:
            change["batch"] = self.batch
        return dumps(change)


Transition = Callable[[TaskRecord, _Change], TaskRecord | None]


class JobStore:
    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "iq",
        *,
        task_retention: int = 30 * 86400,
        payload_retention: int = 86400,
        tenant_defaults: TenantSettings = NO_LIMITS,
        admission_window: int = 0,
        replica_ack: ReplicaAck = NO_REPLICA_ACK,
    ) -> None:
        self._redis = client
        self._replica_ack = replica_ack
        self.keys = Keys(prefix)
        self._task_retention = task_retention
        self._payload_retention = payload_retention
        self._tenant_defaults = tenant_defaults
        self._admission_window = admission_window
        self._create = Script(
            client,
            scripts.CREATE,
            keys=[
                "active",
                "tenant_active",
                "tenant_ready",
                "ready_tenants",
                "admitted",
                "tenant_admitted",
                "queued",
                "tenants",
                "tenant_rate",
                "usage",
                "also_key",
                "queue",
                "tenant_tasks",
                "tenant_queued",
                "deadlines",
                "batch",
                "batch_tasks",
                "capacity",
            ],
            args=[
                "now_ms",
                "tenant",
                "max_queued",
                "rate_per_minute",
                "max_concurrency",
                "window",
                "also_value",
                "also_ttl",
                "usage_ttl",
                "index_ms",
                "batch_id",
                "batch_fields",
                "also_expect",
            ],
            more_keys="task_keys",
            more_args="task_args",
        )
        self._claim_due = Script(
            client,
            scripts.CLAIM_DUE,
            keys=["delayed", "ready_tenants"],
            args=["now_ms"],
            more_keys="ready",
            more_args="candidates",
        )
        self._cas = Script(
            client,
            scripts.COMPARE_AND_SET,
            keys=["task"],
            args=["expected", "document", "change"],
            more_keys="touched",
        )
        self._save_answer = Script(
            client, scripts.SAVE_RESULT, keys=["task", "result"], args=["attempt", "answer", "ttl"]
        )
        self._hold_messages = Script(
            client, scripts.HOLD_MESSAGES, keys=["queued", "running"], args=["held_ms"], more_args="task_ids"
        )
        self._renew = Script(
            client, scripts.RENEW_LEASES, keys=["running"], more_keys="leases", more_args="holders"
        )
        self._delete = Script(
            client,
            scripts.DELETE,
            keys=[
                "task",
                "payload",
                "result",
                "webhook_log",
                "tenant_tasks",
                "tenant_status",
                "webhooks_due",
                "events",
            ],
            args=["expected", "task_id"],
            more_keys="event_keys",
            more_args="event_ids",
        )
        self._claim = Script(
            client, scripts.CLAIM, keys=["source", "target"], args=["max_score", "score", "limit"]
        )
        self._claim_expired = Script(
            client,
            scripts.CLAIM_EXPIRED,
            keys=["running"],
            args=["now_ms", "score"],
            more_keys="leases",
            more_args="candidates",
        )

    # reads ------------------------------------------------------------------------------------------
    def get(self, task_id: str, *, tenant: str | None = None) -> TaskRecord:
        """The task; with ``tenant``, only if that tenant owns it: another's task is not found either."""
        with mapped_redis_errors():
            raw = self._redis.get(self.keys.task(task_id))
        if raw is None:
            raise NotFound(f"no task with id {task_id!r}", field="id")
        task: TaskRecord = json.loads(raw)
        _require_owner(task, tenant)
        return task

    def queue_position(self, task: TaskRecord) -> int | None:
        """Where a queued task stands: 0 once it is admitted (handed to the workers), else 1 + how many
        of its tenant's tasks wait ahead of it in its ready set; None when it is not queued, or waits
        for a retry. Approximate by nature: admission shares places among tenants by weight."""
        if task["status"] != TaskStatus.QUEUED or task["next_attempt_at"]:
            return None
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.zscore(self.keys.admitted, task["id"])
            pipe.zrank(self.keys.tenant_ready(tenant_of(task)), task["id"])
            admitted, rank = pipe.execute()
        if admitted is not None:
            return 0
        return None if rank is None else int(rank) + 1

    def save_result(self, lease: Lease, body: bytes) -> None:
        """Keep an upstream answer whose outputs could not be stored, until the task is final; only
        while the lease's attempt is still the task's open one (else ``LeaseLost``, nothing saved)."""
        with mapped_redis_errors():
            saved = self._save_answer(
                task=self.keys.task(lease.task_id),
                result=self.keys.result(lease.task_id),
                attempt=lease.attempt,
                answer=body,
                ttl=self._payload_retention,
            )
        if saved != 1:
            raise LeaseLost(f"task {lease.task_id} is no longer at attempt {lease.attempt}; answer not kept")

    def ping(self) -> None:
        with mapped_redis_errors():
            self._redis.ping()

    # what the sweeper claims: each member is handed to one caller only -------------------------------
    def claim_due_retries(self, limit: int = 500) -> list[str]:
        """Tasks whose retry is due now: they go back to their tenant's ready set, in their first order
        (their creation and priority), for admission to send (``services/admission.py``). Returns their ids.

        Four round trips when any is due: now (Redis's clock, as the due times: ``_consequences``), the
        candidates, their records (for their tenants), the move.
        """
        keys = self.keys
        with mapped_redis_errors():
            now = self._now_ms()
            found = cast(
                "list[bytes]", self._redis.zrangebyscore(keys.delayed, "-inf", now, start=0, num=limit)
            )
            if not found:
                return []
            candidates = [member.decode() for member in found]
            records = cast(
                "list[bytes | None]", self._redis.mget([keys.task(task_id) for task_id in candidates])
            )
            ready: list[str] = []
            values: list[str | int] = []
            for task_id, raw in zip(candidates, records, strict=True):
                if raw is None:  # expired or deleted meanwhile: nothing to run
                    self._redis.zrem(keys.delayed, task_id)
                    continue
                task: TaskRecord = json.loads(raw)
                ready.append(keys.tenant_ready(tenant_of(task)))
                order = ready_order(clock.epoch_ms(task["created_at"]), task.get("priority", "normal"))
                values += [task_id, tenant_of(task), order]
            if not ready:
                return []
            moved = self._claim_due(
                delayed=keys.delayed,
                ready_tenants=keys.ready_tenants,
                ready=ready,
                now_ms=now,
                candidates=values,
            )
        return [member.decode() for member in moved]

    def claim_past_deadlines(self, limit: int = 500) -> list[str]:
        """Tasks past their ``Cancel-After`` deadline; the caller cancels them (``cancel`` with
        ``DEADLINE_EXCEEDED``). Claimed for a while, so other sweepers leave them alone meanwhile; a
        final task leaves the set with the change that made it final. Now is Redis's clock: a sweeper on a
        host whose clock runs ahead cancels nothing early."""
        now = self._now_ms()
        return self._claim_members(
            self.keys.deadlines, self.keys.deadlines, now, now + DEADLINE_RECLAIM_MS, limit
        )

    def claim_expired_leases(self, lease_seconds: float, limit: int = 500) -> list[str]:
        """Running tasks whose lease expired (their worker is gone); the caller must enqueue them.

        Their deadline moves one lease ahead, so other sweepers leave them alone meanwhile, and a worker
        holding the message sent for one keeps it ahead while it waits to start it (``hold_messages``).
        One whose lease key has not expired yet is left for when it has (``CLAIM_EXPIRED``). The
        candidates are read first, so that the script is given every key it touches. Now is Redis's clock,
        as are the deadlines (``renew_lease``, ``start_attempt``): no process's own clock decides when a
        lease ends.
        """
        with mapped_redis_errors():
            now = self._now_ms()
            found = self._redis.zrangebyscore(self.keys.running, "-inf", now, start=0, num=limit)
            if not found:
                return []
            # bytes: the client does not decode responses, which redis-py's types cannot tell
            candidates = [member.decode() for member in cast("list[bytes]", found)]
            members = self._claim_expired(
                running=self.keys.running,
                leases=[self.keys.lease(task_id) for task_id in candidates],
                now_ms=now,
                score=now + clock.ms(lease_seconds),
                candidates=candidates,
            )
        return [member.decode() for member in members]

    def claim_lost_messages(self, older_than: float, limit: int = 500) -> list[str]:
        """Queued tasks enqueued more than ``older_than`` s ago and not started; to enqueue again.

        Call only when the broker's queue is empty: then such a task's message was lost, unless a worker
        holds it waiting for its turn or an upstream slot, which it says at every renewal pass
        (``hold_messages``).
        """
        now = self._now_ms()
        queued = self.keys.queued
        return self._claim_members(queued, queued, now - clock.ms(older_than), now, limit)

    def hold_messages(self, task_ids: Sequence[str], *, lease_seconds: float) -> list[bool]:
        """A worker holds these tasks' messages, waiting for its turn or an upstream slot (the lease
        keeper's, every interval; ``lease_seconds`` is how long this says so). The queued ones among them
        count as enqueued now, not lost; those the sweeper sent again after their lease expired keep
        their deadline a lease ahead, so that it does not send them a third time while this one waits.
        Always True: a task that has started or ended since is no loss to its waiting message."""
        with mapped_redis_errors():
            self._hold_messages(
                queued=self.keys.queued,
                running=self.keys.running,
                held_ms=clock.ms(lease_seconds),
                task_ids=list(task_ids),
            )
        return [True] * len(task_ids)

    def _now_ms(self) -> int:
        """Now on Redis's clock, which every process shares whatever its host's clock says."""
        with mapped_redis_errors():
            return clock.redis_ms(self._redis.time())

    def _claim_members(self, source: str, target: str, max_score: int, score: int, limit: int) -> list[str]:
        with mapped_redis_errors():
            members = self._claim(source=source, target=target, max_score=max_score, score=score, limit=limit)
        return [member.decode() for member in members]

    # creation ---------------------------------------------------------------------------------------
    def create(
        self,
        *,
        model: str,
        payload: bytes,
        metadata: dict[str, Any] | None,
        webhook: WebhookSubscription | None = None,
        tenant: str = DEFAULT_TENANT,
        priority: str = "normal",
        cancel_after: float | None = None,
        also_set: Callable[[list[TaskRecord]], tuple[str, str, int, str]] | None = None,
        message: Callable[[str], tuple[str, bytes]] | None = None,
        sent: Callable[[Sequence[str]], None] | None = None,
    ) -> TaskRecord:
        """Store one new task (``create_many`` of one)."""
        new = NewTask(model=model, payload=payload, metadata=metadata, webhook=webhook, priority=priority)
        (task,) = self.create_many(
            [new], tenant=tenant, cancel_after=cancel_after, also_set=also_set, message=message, sent=sent
        )
        return task

    def create_many(
        self,
        new_tasks: Sequence[NewTask],
        *,
        tenant: str = DEFAULT_TENANT,
        cancel_after: float | None = None,
        also_set: Callable[[list[TaskRecord]], tuple[str, str, int, str]] | None = None,
        message: Callable[[str], tuple[str, bytes]] | None = None,
        batch: NewBatch | None = None,
        sent: Callable[[Sequence[str]], None] | None = None,
    ) -> list[TaskRecord]:
        """Store new queued tasks of ``tenant`` and their payloads atomically, all or none; return the
        records.

        One script checks the tenant's limits first (``TooManyRequests``: ``tenant_queue_full`` when
        they would pass its ``max_queued``, or ``rate_limited``; nothing written), then writes the
        tasks, their payloads, their bookkeeping and its usage, and admits each at once if it may run
        now (``CREATE``). ``also_set(tasks)`` may name one more record (key, value, ttl, expected) to
        write in the same step (an idempotency record), only if the key holds ``expected`` or nothing
        (the request's own claim; ``IdempotencyConflict``, nothing written, if another request's);
        ``message(task_id)`` the (list, message) of a task's broker message, pushed when the task is
        admitted, so that a task is never stored without being either enqueued or waiting for
        admission, nor enqueued without being stored; ``sent(task_ids)`` is then called with the tasks
        admitted at once (the first ones: once one waits, the rest wait behind it), for a broker whose
        message the script only put in an outbox (``services/broker.py``). With ``batch``, the
        tasks belong to it, and its record is written in the same step (``services/batches.py``).
        """
        now = time.time()
        created_at = clock.iso(now)
        deadline_at = clock.iso(now + cancel_after) if cancel_after is not None else None
        tasks: list[TaskRecord] = [
            {
                "id": new_task_id(),
                "tenant": tenant,
                "batch_id": batch.id if batch else None,
                "priority": new.priority,
                "deadline_at": deadline_at,
                "status": TaskStatus.QUEUED.value,
                "model": new.model,
                "created_at": created_at,
                "started_at": None,
                "finished_at": None,
                "attempts": [],
                "outputs": [],
                "text": [],
                "usage": None,
                "metadata": new.metadata,
                "error": None,
                "next_attempt_at": None,
                "webhook": new.webhook,
            }
            for new in new_tasks
        ]
        keys = self.keys
        also_key, also_value, also_ttl, also_expect = (
            also_set(tasks) if also_set is not None else (keys.active, "", 0, "")
        )
        defaults = self._tenant_defaults
        now_ms = clock.epoch_ms(created_at)  # the index's score is exactly the record's created_at
        deadline_ms = clock.epoch_ms(deadline_at) if deadline_at else ""
        task_keys: list[str] = []
        task_args: list[str | bytes | int] = []
        queue = keys.queued
        for position, (task, new) in enumerate(zip(tasks, new_tasks, strict=True)):
            task_id = task["id"]
            queue, body = message(task_id) if message is not None else (keys.queued, b"")
            task_keys += [keys.task(task_id), keys.payload(task_id), keys.events(task_id)]
            task_args += [
                task_id,
                dumps(task),
                new.payload,
                # a batch's tasks wait in their order: apart by less than a millisecond in all
                repr(ready_order(now_ms, new.priority) + position / len(tasks)),
                deadline_ms,
                body,
            ]
        batch_id = batch.id if batch else ""
        batch_fields = dumps([part for item in batch.fields(tasks).items() for part in item]) if batch else ""
        values: dict[str, Any] = dict(
            active=keys.active,
            tenant_active=keys.tenant_active(tenant),
            tenant_ready=keys.tenant_ready(tenant),
            ready_tenants=keys.ready_tenants,
            admitted=keys.admitted,
            tenant_admitted=keys.tenant_admitted(tenant),
            queued=keys.queued,
            tenants=keys.tenants,
            tenant_rate=keys.tenant_rate(tenant),
            usage=keys.tenant_usage(tenant, clock.day(now)),
            also_key=also_key,
            queue=queue,
            tenant_tasks=keys.tenant_tasks(tenant),
            tenant_queued=keys.tenant_status(tenant, TaskStatus.QUEUED),
            deadlines=keys.deadlines,
            batch=keys.batch(batch_id) if batch else keys.active,
            batch_tasks=keys.batch_tasks(batch_id) if batch else keys.active,
            capacity=keys.capacity,
            task_keys=task_keys,
            now_ms=now_ms,
            tenant=tenant,
            max_queued=defaults.max_queued,
            rate_per_minute=defaults.rate_per_minute,
            max_concurrency=defaults.max_concurrency,
            window=self._admission_window,
            also_value=also_value,
            also_ttl=also_ttl,
            usage_ttl=USAGE_RETENTION_SECONDS,
            index_ms=clock.ms(self._task_retention + INDEX_SLACK_SECONDS),
            batch_id=batch_id,
            batch_fields=batch_fields,
            also_expect=also_expect,
            task_args=task_args,
        )
        with mapped_redis_errors():
            if self._replica_ack.replicas:
                (outcome, value), acknowledged = self._create.call_acknowledged(self._replica_ack, **values)
            else:
                outcome, value = self._create(**values)
        if outcome == -3:
            raise IdempotencyConflict(
                "a request with this Idempotency-Key is still being handled", field="Idempotency-Key"
            )
        if outcome == -1:
            raise TooManyRequests(
                f"tenant {tenant!r} has as many unfinished tasks as it may queue; retry when some are done",
                code="tenant_queue_full",
                retry_after=QUEUE_FULL_RETRY_AFTER,
            )
        if outcome == -2:
            raise TooManyRequests(
                f"tenant {tenant!r} submits faster than its rate_per_minute allows",
                code="rate_limited",
                retry_after=value / 1000,
            )
        if self._replica_ack.replicas:
            # stored on the primary; acknowledged only once on enough replicas (services/replication.py)
            self._replica_ack.require(acknowledged)
        if sent is not None and value:
            sent([task["id"] for task in tasks[:value]])
        return tasks

    # leases -----------------------------------------------------------------------------------------
    def renew_lease(self, lease: Lease) -> bool:
        """Extend a lease its holder still has; False when it was lost (expired and maybe taken)."""
        return self.renew_leases([lease])[0]

    def renew_leases(self, leases: Sequence[Lease]) -> list[bool]:
        """``renew_lease`` for many leases in one round trip (the lease keeper's: a worker holding
        thousands of calls renews them all at once)."""
        holders = [
            value for lease in leases for value in (lease.token, clock.ms(lease.seconds), lease.task_id)
        ]
        with mapped_redis_errors():
            renewed = self._renew(
                running=self.keys.running,
                leases=[self.keys.lease(lease.task_id) for lease in leases],
                holders=holders,
            )
        return [bool(result) for result in renewed]

    # transitions ------------------------------------------------------------------------------------
    def start_attempt(
        self, task_id: str, *, worker: str, lease_seconds: float, give_up: GiveUp
    ) -> Attempt | None:
        """Move a task to running with a new attempt and a lease; None when there is nothing to run.

        Two round trips: one reads the task, its payload and any saved upstream answer together, one
        writes the change (compare-and-set).

        A final task (a redelivered message) is left alone, and so is a task whose lease another worker
        holds, and one waiting for a retry (or a postponement) that is not due yet (a duplicate message:
        the sweeper moves it out of the delayed set when it is due). A task found ``running`` without a
        lease lost its worker: that attempt is closed as ``worker_lost``. A task that ``give_up`` says
        must not run again fails with its error instead.
        """
        token = f"{worker}:{secrets.token_hex(8)}"
        lease_key = self.keys.lease(task_id)

        def change(task: TaskRecord, extra: _Change) -> TaskRecord | None:
            status = TaskStatus(task["status"])
            if status.is_final:
                return None
            extra.require_absent(lease_key)  # another worker's live attempt: leave the task alone
            # a retry (or a postponement) not due yet: a stray message must not start it early; the
            # sweeper moves it out of the delayed set when it is due (``claim_due_retries``)
            extra.require_not_member(self.keys.delayed, task_id)
            now = clock.now_iso()
            _close_open_attempt(task, now, outcome="worker_lost", error_code="worker_lost")
            deadline = task.get("deadline_at")
            if deadline and clock.epoch_ms(deadline) <= clock.epoch_ms(now):  # never call past it
                return _finish(task, TaskStatus.CANCELED, now, error=DEADLINE_EXCEEDED.to_record())
            error = give_up(task)
            if error is not None:
                return _finish(task, TaskStatus.FAILED, now, error=error.to_record())
            _check(status, TaskStatus.RUNNING)
            extra.write("SET", lease_key, token, "PX", clock.ms(lease_seconds))
            # the deadline on Redis's clock, as the lease's TTL: a worker's own clock may be off
            extra.write("ZADD_AFTER_NOW", self.keys.running, clock.ms(lease_seconds), task_id)
            task["status"] = TaskStatus.RUNNING.value
            task["started_at"] = task["started_at"] or now
            task["next_attempt_at"] = None
            task["attempts"].append(
                {
                    "number": len(task["attempts"]) + 1,
                    "started_at": now,
                    "finished_at": None,
                    "outcome": None,
                    "upstream_status": None,
                    "error_code": None,
                    "duration_ms": None,
                    "worker": worker,
                }
            )
            return task

        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self.keys.task(task_id))
            pipe.get(self.keys.payload(task_id))
            pipe.get(self.keys.result(task_id))
            raw, payload, saved = pipe.execute()
        if raw is None:
            raise NotFound(f"no task with id {task_id!r}", field="id")
        task, document = self._write(task_id, change, known=raw)
        if task is None or task["status"] != TaskStatus.RUNNING:
            return None
        lease = Lease(task_id, token, lease_seconds, len(task["attempts"]), document=document)
        return Attempt(task, lease, payload, saved)

    def succeed(
        self,
        lease: Lease,
        *,
        outputs: list[OutputRecord],
        text: list[str],
        usage: dict[str, Any] | None,
        upstream_status: int | None,
    ) -> TaskRecord:
        """Close the lease's attempt as succeeded (``LeaseLost`` if it is not the open one any more).

        The lease's document saves reading the record first: one round trip when the record is as the
        attempt left it.
        """

        def change(task: TaskRecord, extra: _Change) -> TaskRecord:
            if _closed_by(task, lease, "succeeded"):
                return task
            _check(TaskStatus(task["status"]), TaskStatus.SUCCEEDED)
            _require_open_attempt(task, lease)
            now = clock.now_iso()
            _close_open_attempt(task, now, outcome="succeeded", upstream_status=upstream_status)
            task.update({"outputs": outputs, "text": text, "usage": usage, "error": None})
            return _finish(task, TaskStatus.SUCCEEDED, now)

        return self._change_required(lease.task_id, change, known=lease.document, closing=True)

    def schedule_retry(self, lease: Lease, error: JobError, *, delay: float) -> TaskRecord:
        """Close the running attempt as failed-but-retryable and put the task back in the queue."""

        def change(task: TaskRecord, extra: _Change) -> TaskRecord:
            if _closed_by(task, lease, "retry"):
                return task
            _check(TaskStatus(task["status"]), TaskStatus.QUEUED)
            _require_open_attempt(task, lease)
            now = time.time()
            _close_open_attempt(
                task,
                clock.iso(now),
                outcome="retry",
                error_code=error.code,
                upstream_status=error.upstream_status,
            )
            task["status"] = TaskStatus.QUEUED.value
            task["next_attempt_at"] = clock.iso(now + delay)
            return task

        return self._change_required(lease.task_id, change, known=lease.document, closing=True)

    def postpone(
        self, task_id: str, *, delay: float, hold_seconds: float, error: JobError
    ) -> TaskRecord | None:
        """Retry a queued task after ``delay`` s (the limiter asked to wait), or fail it with ``error`` if
        that is more than ``hold_seconds`` after its creation; None if it is not queued."""

        def change(task: TaskRecord, extra: _Change) -> TaskRecord | None:
            if task["status"] != TaskStatus.QUEUED:
                return None
            now = time.time()
            if now + delay > clock.epoch_ms(task["created_at"]) / 1000 + hold_seconds:
                return _finish(task, TaskStatus.FAILED, clock.iso(now), error=error.to_record())
            task["next_attempt_at"] = clock.iso(now + delay)
            return task

        return self._write(task_id, change)[0]

    def fail(self, lease: Lease, error: JobError) -> TaskRecord:
        """Fail the task its holder is running, with ``error``."""

        def change(task: TaskRecord, extra: _Change) -> TaskRecord:
            if _closed_by(task, lease, "failed"):
                return task
            _check(TaskStatus(task["status"]), TaskStatus.FAILED)
            _require_open_attempt(task, lease)
            now = clock.now_iso()
            _close_open_attempt(
                task, now, outcome="failed", error_code=error.code, upstream_status=error.upstream_status
            )
            return _finish(task, TaskStatus.FAILED, now, error=error.to_record())

        return self._change_required(lease.task_id, change, known=lease.document, closing=True)

    def delete(self, task_id: str, *, tenant: str | None = None) -> TaskRecord:
        """Remove a final task (of ``tenant``, if given) and everything the store keeps of it: record,
        payload, saved answer, index entries, webhook events and log. A task that is not final raises
        ``InvalidTransition`` (409): cancel it first. Returns the record as it was."""
        keys = self.keys
        event_ids = [event_id(task_id, status) for status in WEBHOOK_EVENTS]
        with mapped_redis_errors():
            while True:
                raw = self._redis.get(keys.task(task_id))
                if raw is None:
                    raise NotFound(f"no task with id {task_id!r}", field="id")
                task: TaskRecord = json.loads(raw)
                _require_owner(task, tenant)
                if not TaskStatus(task["status"]).is_final:
                    raise InvalidTransition(f"a {task['status']} task cannot be deleted; cancel it first")
                deleted = self._delete(
                    task=keys.task(task_id),
                    payload=keys.payload(task_id),
                    result=keys.result(task_id),
                    webhook_log=keys.webhook_log(task_id),
                    tenant_tasks=keys.tenant_tasks(tenant_of(task)),
                    tenant_status=keys.tenant_status(tenant_of(task), task["status"]),
                    webhooks_due=keys.webhooks_due,
                    events=keys.events(task_id),
                    event_keys=[
                        key
                        for event in event_ids
                        for key in (keys.webhook_event(event), keys.webhook_state(event))
                    ],
                    expected=raw,
                    task_id=task_id,
                    event_ids=event_ids,
                )
                if deleted == 1:
                    return task

    def cancel(self, task_id: str, *, tenant: str | None = None, error: JobError | None = None) -> TaskRecord:
        """Cancel a queued or running task (of ``tenant``, if given: another's is not found), with
        ``error`` if given (a deadline); a final one raises ``InvalidTransition`` (409).

        A running attempt is closed as ``canceled`` and its lease dropped: the worker's call may still be
        in flight, but its result is discarded (the task can no longer succeed, and the worker's other
        transitions need the lease).
        """

        def change(task: TaskRecord, extra: _Change) -> TaskRecord:
            _require_owner(task, tenant)
            status = TaskStatus(task["status"])
            if status.is_final:  # what a client canceling it twice, or too late, needs to hear
                raise InvalidTransition(
                    f"task {task_id} is already {status.value} (final)", current=status.value
                )
            _check(status, TaskStatus.CANCELED)
            now = clock.now_iso()
            _close_open_attempt(task, now, outcome="canceled")
            return _finish(task, TaskStatus.CANCELED, now, error=error.to_record() if error else None)

        return self._change_required(task_id, change)

    # the one writer ---------------------------------------------------------------------------------
    def _change_required(
        self,
        task_id: str,
        change: Callable[[TaskRecord, _Change], TaskRecord],
        *,
        known: str | None = None,
        closing: bool = False,
    ) -> TaskRecord:
        task, _ = self._write(task_id, change, known=known, closing=closing)
        assert task is not None
        return task

    def _write(
        self, task_id: str, change: Transition, *, known: str | bytes | None = None, closing: bool = False
    ) -> tuple[TaskRecord | None, str | None]:
        """Apply ``change`` with compare-and-set; return the new task and its document as written.

        ``known``: the document the caller believes is stored; the first try compares against it
        without reading (one round trip instead of two), and reads only if it was not current.

        ``closing``: an attempt's closing write, which records what the upstream was paid for. With
        ``REDIS_MIN_REPLICAS_ACK`` = n, it is followed by ``WAIT`` like a submission
        (``services/replication.py``), and raises ``StoreUnavailable`` unless n replicas hold it: the
        worker then sends it again (``JobRunner``), on the primary Sentinel names by then, until one is
        confirmed. A closing write sent again finds its own change applied (``_closed_by``) and rewrites
        the record unchanged, which the ``WAIT`` then covers. Without it, a failover that loses the
        write makes the task run, and be paid for, again.
        """
        key = self.keys.task(task_id)
        with mapped_redis_errors():
            while True:
                raw, known = (known, None) if known is not None else (self._redis.get(key), None)
                if raw is None:
                    raise NotFound(f"no task with id {task_id!r}", field="id")
                old: TaskRecord = json.loads(raw)
                extra = _Change(key)
                new = change(json.loads(raw), extra)
                if new is None:
                    return None, None
                if new != old:  # unchanged: a closing write sent again, rewritten for its WAIT only
                    self._consequences(old, new, extra)
                document = dumps(new)
                values = dict(
                    task=key, touched=extra.keys[1:], expected=raw, document=document, change=extra.encoded()
                )
                if closing and self._replica_ack.replicas:
                    written, acknowledged = self._cas.call_acknowledged(self._replica_ack, **values)
                else:
                    written, acknowledged = self._cas(**values), self._replica_ack.replicas
                if written == 1:
                    _count_if_finished(old, new)
                    self._replica_ack.require(acknowledged)
                    return new, document
                if written == -1:
                    return None, None

    def _consequences(self, old: TaskRecord, new: TaskRecord, extra: _Change) -> None:
        """The bookkeeping that follows from a change, written in the same atomic step."""
        task_id = new["id"]
        tenant = tenant_of(new)
        keys = self.keys
        status = TaskStatus(new["status"])
        if old["status"] != new["status"]:
            extra.write("ZREM", keys.tenant_status(tenant, old["status"]), task_id)
            extra.write(
                "ZADD", keys.tenant_status(tenant, status), clock.epoch_ms(new["created_at"]), task_id
            )
            expired = clock.now_ms() - clock.ms(self._task_retention + INDEX_SLACK_SECONDS)
            extra.write("ZREMRANGEBYSCORE", keys.tenant_status(tenant, status), "-inf", f"({expired}")
        if status.is_final:
            extra.write("SREM", keys.active, task_id)
            extra.write("SREM", keys.tenant_active(tenant), task_id)
            extra.write("ZREM", keys.deadlines, task_id)
            extra.write("EXPIRE", keys.task(task_id), self._task_retention)
            extra.write("EXPIRE", keys.payload(task_id), self._payload_retention)
            extra.write("DEL", keys.result(task_id))
            usage = keys.tenant_usage(tenant, clock.day())
            extra.write("HINCRBY", usage, status.value, 1)
            if new["outputs"]:
                extra.write("HINCRBY", usage, "images", len(new["outputs"]))
                extra.write(
                    "HINCRBY", usage, "bytes_stored", sum(output["bytes"] for output in new["outputs"])
                )
            extra.write("EXPIRE", usage, USAGE_RETENTION_SECONDS)
        if status == TaskStatus.RUNNING:  # admitted, even if a stray message started it
            extra.write("ZREM", keys.tenant_ready(tenant), task_id)
            extra.write("ZADD", keys.admitted, "NX", clock.now_ms(), task_id)
            extra.write("ZADD", keys.tenant_admitted(tenant), "NX", clock.now_ms(), task_id)
        else:  # final, or waiting for a retry: its admission ends, its place goes to the next task
            extra.write("ZREM", keys.tenant_ready(tenant), task_id)
            extra.write("ZREM", keys.admitted, task_id)
            extra.write("ZREM", keys.tenant_admitted(tenant), task_id)
        if status == TaskStatus.QUEUED and new["next_attempt_at"]:
            # due after the delay on Redis's clock, which the sweeper reads (``claim_due_retries``)
            delay_ms = max(0, clock.epoch_ms(new["next_attempt_at"]) - clock.now_ms())
            extra.write("ZADD_AFTER_NOW", keys.delayed, delay_ms, task_id)
            extra.write("ZREM", keys.queued, task_id)
        elif status != TaskStatus.QUEUED:
            extra.write("ZREM", keys.queued, task_id)
            extra.write("ZREM", keys.delayed, task_id)
        if status != TaskStatus.RUNNING:
            extra.write("DEL", keys.lease(task_id))
            extra.write("ZREM", keys.running, task_id)
        event = event_for_change(old, new)
        if event is not None:
            extra.write("SET", keys.webhook_event(event.id), event.document, "NX")
            extra.write("ZADD", keys.webhooks_due, "NX", clock.now_ms(), event.id)
        # the task's numbered status events, and a wake-up for the requests that wait for them
        # (services/task_events.py); the create writes event 1 (store_scripts.CREATE)
        batch_id = new.get("batch_id")
        if old["status"] != new["status"] and batch_id:
            completion = batch_completed_event(batch_id, tenant)
            extra.count_in_batch(keys, new, old["status"], completion, self._task_retention)
        if old["status"] != new["status"]:
            extra.write("RPUSH", keys.events(task_id), status.value)
            extra.write("PUBLISH", keys.task_events, task_id)
            if status.is_final:
                extra.write("EXPIRE", keys.events(task_id), self._task_retention)


def _count_if_finished(old: TaskRecord, new: TaskRecord) -> None:
    """A change that made the task final is counted in the metrics, in whichever process made it."""
    if new["status"] in FINAL_STATUSES and old["status"] not in FINAL_STATUSES:
        metrics.task_finished(new["status"], created_at=new["created_at"], finished_at=new["finished_at"])


def _require_owner(task: TaskRecord, tenant: str | None) -> None:
    """With a ``tenant``, the task must be its own: another tenant's task is not found (404, not 403:
    whether an id exists is not the caller's business)."""
    if tenant is not None and tenant_of(task) != tenant:
        raise NotFound(f"no task with id {task['id']!r}", field="id")


def _closed_by(task: TaskRecord, lease: Lease, outcome: str) -> bool:
    """The lease's attempt is closed with ``outcome`` already, by its own holder: the closing write was
    applied before, and is sent again (its answer was lost with a connection, or a replica did not
    confirm it in time)."""
    attempts = task["attempts"]
    if len(attempts) < lease.attempt:
        return False
    attempt = attempts[lease.attempt - 1]
    return attempt["outcome"] == outcome and attempt["worker"] == lease.worker


def _require_open_attempt(task: TaskRecord, lease: Lease) -> None:
    """The lease's attempt must be the task's open attempt: none started after it, none closed it."""
    attempts = task["attempts"]
    if len(attempts) != lease.attempt or attempts[-1]["finished_at"] is not None:
        raise LeaseLost(
            f"task {lease.task_id} is no longer at attempt {lease.attempt} (another worker took it over "
            "after its lease expired, or it was closed); this write is refused"
        )


def _check(current: TaskStatus, target: TaskStatus) -> None:
    if target not in ALLOWED_TRANSITIONS[current]:
        raise InvalidTransition(f"a {current.value} task cannot become {target.value}", current=current.value)


def _finish(
    task: TaskRecord, status: TaskStatus, now: str, *, error: ErrorRecord | None = None
) -> TaskRecord:
    task["status"] = status.value
    task["finished_at"] = now
    task["next_attempt_at"] = None
    if error is not None:
        task["error"] = error
    return task


def _close_open_attempt(
    task: TaskRecord,
    now: str,
    *,
    outcome: str,
    error_code: str | None = None,
    upstream_status: int | None = None,
) -> None:
    if not task["attempts"] or task["attempts"][-1]["finished_at"] is not None:
        return
    attempt: AttemptRecord = task["attempts"][-1]
    attempt.update(
        {
            "finished_at": now,
            "outcome": outcome,
            "error_code": error_code,
            "upstream_status": upstream_status,
            "duration_ms": clock.epoch_ms(now) - clock.epoch_ms(attempt["started_at"]),
        }
    )
