"""Webhook delivery: the outbox in Redis, the dispatcher that claims due events, and one delivery attempt.

The store writes an event into the outbox in the same atomic step as the status change that causes it
(``services/store.py``, ``_consequences``): ``{prefix}:wh:event:{id}`` holds the event (its task as it
was at that moment) and ``{prefix}:wh:due`` scores the event's id with when its next attempt is due
(ms). Beside them, here:

- ``{prefix}:wh:state:{id}``  hash: ``attempts`` made, ``round_start`` (attempts made before the last
  redeliver: the retry schedule restarts there), ``status`` (pending, delivered, gone, refused,
  given_up), ``claim`` (the token of the claim allowed to deliver it) and ``next_at`` (ms);
- ``{prefix}:wh:log:{task id}`` list: one JSON entry per attempt of any of the task's events (the last
  ``LOG_CAPACITY``), shown by ``GET /v1/tasks/{id}`` as ``webhook.deliveries``.

An event is pending while it is in ``due``; nothing else keeps it, so a Celery message or a worker can
be lost without losing a delivery:

1. The dispatcher (a thread in each worker consuming the ``webhooks`` queue) claims due events with
   one script: their score moves a lease ahead (``WEBHOOK_LEASE_SECONDS``) and a fresh claim token is
   recorded. It sends ``imagegen.deliver_webhook(event_id, claim)`` to the ``webhooks`` queue.
2. The task starts the attempt atomically, only if its claim is still current (a message redelivered
   by the broker long after, or one superseded by a redeliver, does nothing): ``attempts`` + 1 and the
   lease renewed from now.
3. One POST, signed (``services/webhook_signing.py``), through the address guard
   (``services/netguard.py``), no redirects, ``WEBHOOK_TIMEOUT`` for connect and read.
4. One script records the attempt in the log and either removes the event from ``due`` (delivered,
   410 Gone, refused address, schedule exhausted) or sets its next due time.

A worker killed between 1 and 4 leaves the event in ``due`` with its lease as score: when the lease
expires, a dispatcher claims it again. Deliveries are at least once; receivers de-duplicate by
``webhook-id``, which is the event's id on every attempt.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from services.config import Config
from services.errors import InvalidRequest, ServiceError
from services.netguard import AddressNotAllowed, Resolver, check_webhook_url, deadline, guarded_transport
from services.periodic import Periodic
from services.storage import Storage
from services.store import JobStore, Task, mapped_redis_errors, now_iso
from services.task_view import task_view
from services.webhook_signing import signed_headers

log = logging.getLogger(__name__)

LOG_CAPACITY = 50
RETENTION_SECONDS = 30 * 86400  # delivered or abandoned events and the log, like a final task
MAX_RETRY_AFTER_SECONDS = 86400.0
MAX_ANSWER_BYTES = 64 * 1024  # what we read of a receiver's answer (for keep-alive), at most
USER_AGENT = "imagegen-queue-webhooks/1"
DEFAULT_EVENTS = ("succeeded", "failed", "canceled")
_LATEST_FIRST = ("succeeded", "failed", "canceled", "running")  # a task has one final event at most

# KEYS[1]: due. ARGV: now (ms), lease deadline (ms), limit, claim token prefix, state key prefix.
# Returns [event id, claim token, ...].
_CLAIM = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for index, member in ipairs(members) do
  local token = ARGV[4] .. ':' .. index
  redis.call('ZADD', KEYS[1], ARGV[2], member)
  redis.call('HSET', ARGV[5] .. member, 'claim', token)
  claimed[#claimed + 1] = member
  claimed[#claimed + 1] = token
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


def make_event_id(task_id: str, status: str) -> str:
    """The id the store gives the event of ``task_id`` reaching ``status`` (also its ``webhook-id``)."""
    return f"msg_{task_id}_{status}"


@dataclass(frozen=True)
class Started:
    """An attempt that may run: the event, this attempt's number, and its number in the current round."""

    event: dict[str, Any]
    attempt: int
    round_attempt: int


class WebhookOutbox:
    """The webhook keys in Redis; every change is one script, so it is atomic."""

    def __init__(self, client: redis.Redis, store: JobStore) -> None:
        self._redis = client
        self._store = store
        self._claim = client.register_script(_CLAIM)
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)
        self._redeliver = client.register_script(_REDELIVER)

    def key(self, *parts: str) -> str:
        return self._store.key("wh", *parts)

    def claim_due(self, lease_seconds: float, limit: int = 200) -> list[tuple[str, str]]:
        """Events due now, each with the claim token its delivery must present; leased meanwhile."""
        now = _now_ms()
        token = secrets.token_hex(8)
        with mapped_redis_errors():
            flat = self._claim(
                keys=[self.key("due")],
                args=[now, now + _ms(lease_seconds), limit, token, self.key("state", "")],
            )
        items = [value.decode() for value in flat]
        return list(zip(items[0::2], items[1::2], strict=True))

    def begin(self, event_id: str, claim: str, lease_seconds: float) -> Started | None:
        keys = [self.key("event", event_id), self.key("state", event_id), self.key("due")]
        with mapped_redis_errors():
            result = self._begin(keys=keys, args=[claim, event_id, _now_ms() + _ms(lease_seconds)])
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
        superseded = {**entry, "next_retry_at": None}
        keys = [
            self.key("state", event_id),
            self.key("due"),
            self.key("log", task_id),
            self.key("event", event_id),
        ]
        args = [
            claim,
            event_id,
            _dump(entry),
            _dump(superseded),
            "" if next_due_ms is None else str(next_due_ms),
            final_status,
            LOG_CAPACITY,
            RETENTION_SECONDS,
        ]
        with mapped_redis_errors():
            return self._finish(keys=keys, args=args) == 1

    def deliveries(self, task_id: str) -> list[dict[str, Any]]:
        with mapped_redis_errors():
            raw = self._redis.lrange(self.key("log", task_id), 0, -1)
        return [json.loads(item) for item in raw]

    def state(self, event_id: str) -> dict[str, str]:
        with mapped_redis_errors():
            raw = self._redis.hgetall(self.key("state", event_id))
        return {key.decode(): value.decode() for key, value in raw.items()}

    def is_pending(self, event_id: str) -> bool:
        with mapped_redis_errors():
            return self._redis.zscore(self.key("due"), event_id) is not None

    def latest_event_id(self, task: Task) -> str | None:
        """The task's most recent event that is still kept: its final one, else its ``running`` one."""
        webhook = task.get("webhook")
        if not webhook:
            return None
        statuses = [status for status in _LATEST_FIRST if status in webhook["events"]]
        candidates = [make_event_id(task["id"], status) for status in statuses]
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for candidate in candidates:
                pipe.exists(self.key("event", candidate))
            found = pipe.execute()
        return next((candidate for candidate, exists in zip(candidates, found, strict=True) if exists), None)

    def redeliver(self, event_id: str) -> bool:
        """Make the event due now, with a fresh retry schedule; False if it does not exist."""
        keys = [self.key("event", event_id), self.key("state", event_id), self.key("due")]
        with mapped_redis_errors():
            return self._redeliver(keys=keys, args=[event_id, _now_ms()]) == 1


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: int
    retry_after: float | None = None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookSender:
    """Signs and POSTs one webhook request through the address guard."""

    def __init__(self, config: Config, *, resolver: Resolver | None = None) -> None:
        self._config = config
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=30)
        kwargs = {"resolver": resolver} if resolver is not None else {}
        transport = guarded_transport(allow_private=config.webhook_allow_private, limits=limits, **kwargs)
        self._client = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(config.webhook_timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": USER_AGENT},
        )

    def close(self) -> None:
        self._client.close()

    def send(self, url: str, msg_id: str, body: bytes) -> AttemptResult:
        secret = self._config.webhook_signing_secret
        if secret is None:
            raise WebhooksNotConfigured()
        started = time.monotonic()
        if urlsplit(url).scheme != "https" and not self._config.webhook_allow_http:
            return AttemptResult(None, "refused: plain http (WEBHOOK_ALLOW_HTTP is not set)", 0, refused=True)
        headers = {"content-type": "application/json", **signed_headers(secret, msg_id, body)}
        try:
            # connect, then the answer: each within WEBHOOK_TIMEOUT, and the whole within twice that
            with deadline(2 * self._config.webhook_timeout):
                with self._client.stream("POST", url, content=body, headers=headers) as response:
                    read = 0
                    for chunk in response.iter_raw():
                        read += len(chunk)
                        if read > MAX_ANSWER_BYTES:
                            break
                    status = response.status_code
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
        except AddressNotAllowed as exc:
            return AttemptResult(None, f"refused: {exc.message}", _since(started), refused=True)
        except httpx.TimeoutException as exc:
            return AttemptResult(None, f"timeout: {type(exc).__name__}", _since(started))
        except httpx.HTTPError as exc:
            return AttemptResult(None, f"{type(exc).__name__}: {exc}"[:300], _since(started))
        error = "redirect not followed" if 300 <= status < 400 else None
        return AttemptResult(status, error, _since(started), retry_after)


class WebhooksNotConfigured(InvalidRequest):
    code = "webhooks_not_configured"

    def __init__(self) -> None:
        super().__init__(
            "webhooks are not configured on this server (WEBHOOK_SIGNING_SECRET is unset): "
            "nothing would be signed",
            field="webhook_url",
        )


class WebhookService:
    """What the API and the workers do with webhooks."""

    def __init__(
        self,
        config: Config,
        store: JobStore,
        storage: Storage,
        client: redis.Redis,
        *,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        self.outbox = WebhookOutbox(client, store)
        self._store = store
        self._storage = storage
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
    def subscription(self, url: str | None, events: tuple[str, ...] | None) -> dict[str, Any] | None:
        """The ``webhook`` a submission asks for, checked (400 if refused); None without a URL."""
        if url is None:
            return None
        if self.config.webhook_signing_secret is None:
            raise WebhooksNotConfigured()
        check_webhook_url(
            url, allow_http=self.config.webhook_allow_http, allow_private=self.config.webhook_allow_private
        )
        return {"url": url, "events": list(events or DEFAULT_EVENTS)}

    def deliveries(self, task: Task) -> list[dict[str, Any]] | None:
        return self.outbox.deliveries(task["id"]) if task.get("webhook") else None

    def redeliver(self, task: Task) -> dict[str, Any]:
        """Send the task's latest event again (a given-up one gets a fresh schedule)."""
        latest = self.outbox.latest_event_id(task)
        if latest is None or not self.outbox.redeliver(latest):
            reason = "has no webhook" if not task.get("webhook") else "has no webhook event yet"
            raise ServiceError(f"task {task['id']} {reason}", code="no_webhook", status=409)
        status = latest.rsplit("_", 1)[1]
        return {"task_id": task["id"], "webhook_id": latest, "event": f"task.{status}", "status": "pending"}

    # worker -----------------------------------------------------------------------------------------
    def deliver(self, event_id: str, claim: str) -> str | None:
        """One delivery attempt of a claimed event; its outcome, or None when there was nothing to do."""
        if self.config.webhook_signing_secret is None:
            log.error(
                "webhook %s NOT sent: WEBHOOK_SIGNING_SECRET is unset on this worker; it stays in the "
                "outbox for a worker that has the secret",
                event_id,
            )
            return None
        started = self.outbox.begin(event_id, claim, self.config.webhook_lease_seconds)
        if started is None:
            return None
        event = started.event
        task_id = event["task_id"]
        attempted_at = now_iso()
        try:
            body = self.payload(event)
            result = self.sender.send(event["task"]["webhook"]["url"], event["id"], body)
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
            "next_retry_at": _iso_ms(next_due) if next_due is not None else None,
        }
        self.outbox.finish(event_id, task_id, claim, entry, next_due_ms=next_due, final_status=outcome)
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

    def payload(self, event: dict[str, Any]) -> bytes:
        """``{"type", "timestamp", "data"}``, data being the task as ``GET /v1/tasks/{id}`` shows it
        (as it was when the event happened) with freshly signed output URLs."""
        snapshot = event["task"]
        data = task_view(
            snapshot,
            self._storage,
            base_url=self.config.public_base_url,
            deliveries=self.outbox.deliveries(snapshot["id"]),
        )
        document = {"type": event["type"], "timestamp": event["timestamp"], "data": data}
        return json.dumps(document, separators=(",", ":")).encode()

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
        return "failed", _now_ms() + round(delay * 1000)


class WebhookDispatcher:
    """Claims due webhook events and sends their deliveries to the ``webhooks`` queue.

    One runs in each worker that consumes that queue; any number are safe, since a claim is atomic.
    It ticks every ``WEBHOOK_DISPATCH_INTERVAL`` (50 ms), and again at once while it finds a full batch.
    It claims nothing while the queue already holds ``max_backlog`` messages: a claimed event must start
    within its lease, or it is claimed (and sent) again, so after an outage it drains the outbox at the
    pace of the workers instead of flooding the queue.
    """

    def __init__(
        self,
        outbox: WebhookOutbox,
        enqueue: Callable[[str, str], None],
        backlog: Callable[[], int],
        *,
        lease_seconds: float,
        interval: float,
        batch: int = 200,
        max_backlog: int = 400,
    ) -> None:
        self._outbox = outbox
        self._enqueue = enqueue
        self._backlog = backlog
        self._lease_seconds = lease_seconds
        self._interval = interval
        self._batch = batch
        self._max_backlog = max_backlog
        self._periodic = Periodic("webhook-dispatcher", interval, lambda: self.tick() >= batch)

    def tick(self) -> int:
        with mapped_redis_errors():
            room = self._max_backlog - self._backlog()
        if room <= 0:
            return 0
        claimed = self._outbox.claim_due(self._lease_seconds, min(self._batch, room))
        for event_id, claim in claimed:
            try:
                self._enqueue(event_id, claim)
            except Exception as exc:  # the lease expires and the event is claimed again
                log.warning("webhook %s: enqueue failed (%s); retried after its lease", event_id, exc)
        return len(claimed)

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _now_ms() -> int:
    return round(time.time() * 1000)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _iso_ms(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
