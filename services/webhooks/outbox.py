"""The webhook outbox in Redis: the event format, and every change to an event, each one script.

The store writes an event in the same atomic step as the status change that causes it
(``event_for_change``, called by ``services/store.py``): ``{p}:wh:event:{id}`` holds the event (its task
as it was at that moment) and ``{p}:wh:due`` scores the event's id with when its next attempt is due
(ms). Beside them, here:

- ``{p}:wh:state:{id}``  hash: ``attempts`` made, ``round_start`` (attempts made before the last
  redeliver: the retry schedule restarts there), ``status`` (pending, delivered, gone, refused,
  given_up), ``claim`` (the token of the claim allowed to deliver it) and ``next_at`` (ms);
- ``{p}:wh:log:{task id}`` list: one JSON entry per attempt of any of the task's events (the last
  ``LOG_CAPACITY``), shown by ``GET /v1/tasks/{id}`` as ``webhook.deliveries``.

An event is pending while it is in ``due``; nothing else keeps it, so a Celery message or a worker can
be lost without losing a delivery.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, cast

import redis

from services import clock
from services.keys import Keys
from services.lua import Script
from services.records import TaskRecord
from services.redis_errors import mapped_redis_errors
from services.serialization import dumps

LOG_CAPACITY = 50
RETENTION_SECONDS = 30 * 86400  # the default: delivered or abandoned events and the log, like a final task
DEFAULT_EVENTS = ("succeeded", "failed", "canceled")
_LATEST_FIRST = ("succeeded", "failed", "canceled", "running")  # a task has one final event at most

# KEYS[1]: due, KEYS[2..]: the state key of each candidate; ARGV[4..]: the candidates, in that order.
# ARGV[1]: now (ms), ARGV[2]: lease deadline (ms), ARGV[3]: claim token prefix. A candidate still due
# is leased and given a fresh claim token. Returns [event id, claim token, ...].
_CLAIM = """
local claimed = {}
for index = 4, #ARGV do
  local member = ARGV[index]
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    local token = ARGV[3] .. ':' .. index
    redis.call('ZADD', KEYS[1], ARGV[2], member)
    redis.call('HSET', KEYS[index - 2], 'claim', token)
    claimed[#claimed + 1] = member
    claimed[#claimed + 1] = token
  end
end
return claimed
"""

# KEYS: event, state, due. ARGV: claim token, event id, lease deadline (ms).
# Returns {1, event, attempts, round_start} when the attempt may run, {0} when the claim is stale or the
# event no longer pending, {-1} when the event is gone (it is then dropped from due).
_BEGIN = """
local event = redis.call('GET', KEYS[1])
if not event then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return {-1}
end
if redis.call('HGET', KEYS[2], 'claim') ~= ARGV[1] then return {0} end
if not redis.call('ZSCORE', KEYS[3], ARGV[2]) then return {0} end
local attempts = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
local round_start = tonumber(redis.call('HGET', KEYS[2], 'round_start') or '0')
redis.call('HSET', KEYS[2], 'status', 'pending')
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return {1, event, attempts, round_start}
"""

# KEYS: state, due, log, event. ARGV: claim token, event id, log entry, log entry if the claim was
# superseded meanwhile, next due (ms, '' when done), final status, log capacity, retention (s).
# Returns 1 when the outcome was applied, 0 when only logged (a redeliver or a new claim took over).
_FINISH = """
local current = redis.call('HGET', KEYS[1], 'claim') == ARGV[1]
redis.call('RPUSH', KEYS[3], current and ARGV[3] or ARGV[4])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[7]), -1)
redis.call('EXPIRE', KEYS[3], ARGV[8])
if not current then return 0 end
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[2])
  redis.call('HSET', KEYS[1], 'status', 'pending', 'next_at', ARGV[5])
else
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('HSET', KEYS[1], 'status', ARGV[6], 'next_at', '')
  redis.call('HDEL', KEYS[1], 'claim')
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  redis.call('EXPIRE', KEYS[4], ARGV[8])
end
return 1
"""

# KEYS: event, state, due. ARGV: event id, now (ms). Returns 0 when the event does not exist (any more).
_REDELIVER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local attempts = redis.call('HGET', KEYS[2], 'attempts') or '0'
redis.call('HSET', KEYS[2], 'round_start', attempts, 'status', 'pending', 'claim', '', 'next_at', ARGV[2])
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""


def event_id(task_id: str, status: str) -> str:
    """The id of the event of ``task_id`` reaching ``status``; also its ``webhook-id`` on every attempt."""
    return f"msg_{task_id}_{status}"


def event_status(event_id_: str) -> str:
    """The status an event id stands for (``event_id``'s inverse)."""
    return event_id_.rsplit("_", 1)[1]


def event_task_id(event_id_: str) -> str:
    """The task (or batch) an event id is about (``event_id``'s inverse)."""
    return event_id_.removeprefix("msg_").rsplit("_", 1)[0]


@dataclass(frozen=True)
class OutboxEvent:
    """What the store writes into the outbox with a change: the event's id and its document."""

    id: str
    document: str


def event_for_change(old: TaskRecord, new: TaskRecord) -> OutboxEvent | None:
    """The event a task's change from ``old`` to ``new`` causes, if its webhook asked for it.

    ``running`` is sent only the first time a task runs (not again for a retry or a redelivery).
    """
    webhook = new["webhook"]
    status = new["status"]
    if not webhook or status not in webhook["events"] or old["status"] == status:
        return None
    if status == "running" and old["started_at"] is not None:
        return None
    identifier = event_id(new["id"], status)
    event = {
        "id": identifier,
        "task_id": new["id"],
        "type": f"task.{status}",
        "timestamp": clock.now_iso(),
        "task": new,
    }
    return OutboxEvent(identifier, dumps(event))


def batch_completed_event(batch_id: str, tenant: str) -> OutboxEvent:
    """The ``batch.completed`` event of a batch, written by the change that finishes its last task if
    its webhook asked for it (``services/store_scripts.py``); its payload is made from the batch as it
    is when delivered (final by then)."""
    identifier = event_id(batch_id, "completed")
    event = {
        "id": identifier,
        "batch_id": batch_id,
        "tenant": tenant,
        "type": "batch.completed",
        "timestamp": clock.now_iso(),
    }
    return OutboxEvent(identifier, dumps(event))


@dataclass(frozen=True)
class Started:
    """An attempt that may run: the event, this attempt's number, and its number in the current round."""

    event: dict[str, Any]
    attempt: int
    round_attempt: int


class WebhookOutbox:
    """The webhook keys in Redis; every change is one script, so it is atomic."""

    def __init__(self, client: redis.Redis, keys: Keys, *, retention: int = RETENTION_SECONDS) -> None:
        """``retention``: how long a delivered or abandoned event and the log are kept (s): the task's own
        (``TASK_RETENTION_DAYS``)."""
        self._redis = client
        self._keys = keys
        self._retention = retention
        self._claim = Script(
            client,
            _CLAIM,
            keys=["due"],
            args=["now_ms", "deadline_ms", "token_prefix"],
            more_keys="states",
            more_args="candidates",
        )
        self._begin = Script(
            client, _BEGIN, keys=["event", "state", "due"], args=["claim", "event_id", "deadline_ms"]
        )
        self._finish = Script(
            client,
            _FINISH,
            keys=["state", "due", "log", "event"],
            args=[
                "claim",
                "event_id",
                "entry",
                "superseded_entry",
                "next_due_ms",
                "final_status",
                "log_capacity",
                "retention",
            ],
        )
        self._redeliver = Script(
            client, _REDELIVER, keys=["event", "state", "due"], args=["event_id", "now_ms"]
        )

    def claim_due(self, lease_seconds: float, limit: int = 200) -> list[tuple[str, str]]:
        """Events due now, each with the claim token its delivery must present; leased meanwhile.

        The candidates are read first, so that the script is given every key it touches.
        """
        now = clock.now_ms()
        due = self._keys.webhooks_due
        with mapped_redis_errors():
            found = self._redis.zrangebyscore(due, "-inf", now, start=0, num=limit)
            if not found:
                return []
            # bytes: the client does not decode responses, which redis-py's types cannot tell
            candidates = [member.decode() for member in cast("list[bytes]", found)]
            flat = self._claim(
                due=due,
                states=[self._keys.webhook_state(candidate) for candidate in candidates],
                now_ms=now,
                deadline_ms=now + clock.ms(lease_seconds),
                token_prefix=secrets.token_hex(8),
                candidates=candidates,
            )
        items = [value.decode() for value in flat]
        return list(zip(items[0::2], items[1::2], strict=True))

    def begin(self, event_id: str, claim: str, lease_seconds: float) -> Started | None:
        with mapped_redis_errors():
            result = self._begin(
                event=self._keys.webhook_event(event_id),
                state=self._keys.webhook_state(event_id),
                due=self._keys.webhooks_due,
                claim=claim,
                event_id=event_id,
                deadline_ms=clock.now_ms() + clock.ms(lease_seconds),
            )
        if result[0] != 1:
            return None
        attempt, round_start = int(result[2]), int(result[3])
        return Started(json.loads(result[1]), attempt, attempt - round_start)

    def finish(
        self,
        event_id: str,
        task_id: str,
        claim: str,
        entry: dict[str, Any],
        *,
        next_due_ms: int | None,
        final_status: str,
    ) -> bool:
        with mapped_redis_errors():
            applied = self._finish(
                state=self._keys.webhook_state(event_id),
                due=self._keys.webhooks_due,
                log=self._keys.webhook_log(task_id),
                event=self._keys.webhook_event(event_id),
                claim=claim,
                event_id=event_id,
                entry=dumps(entry),
                superseded_entry=dumps({**entry, "next_retry_at": None}),
                next_due_ms="" if next_due_ms is None else str(next_due_ms),
                final_status=final_status,
                log_capacity=LOG_CAPACITY,
                retention=self._retention,
            )
        return bool(applied == 1)

    def deliveries(self, task_id: str) -> list[dict[str, Any]]:
        with mapped_redis_errors():
            raw = self._redis.lrange(self._keys.webhook_log(task_id), 0, -1)
        return [json.loads(item) for item in raw]

    def is_pending(self, event_id: str) -> bool:
        with mapped_redis_errors():
            return self._redis.zscore(self._keys.webhooks_due, event_id) is not None

    def latest_event_id(self, task: TaskRecord) -> str | None:
        """The task's most recent event that is still kept: its final one, else its ``running`` one."""
        webhook = task["webhook"]
        if not webhook:
            return None
        candidates = [event_id(task["id"], status) for status in _LATEST_FIRST if status in webhook["events"]]
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for candidate in candidates:
                pipe.exists(self._keys.webhook_event(candidate))
            found = pipe.execute()
        return next((candidate for candidate, exists in zip(candidates, found, strict=True) if exists), None)

    def redeliver(self, event_id: str) -> bool:
        """Make the event due now, with a fresh retry schedule; False if it does not exist."""
        with mapped_redis_errors():
            made_due = self._redeliver(
                event=self._keys.webhook_event(event_id),
                state=self._keys.webhook_state(event_id),
                due=self._keys.webhooks_due,
                event_id=event_id,
                now_ms=clock.now_ms(),
            )
        return bool(made_due == 1)
