"""Idempotent submission: one ``Idempotency-Key`` (per tenant), one task, however often it is sent.

A key moves through two records (``services/keys.py``):

- ``pending`` (SET NX, short-lived): a request with this key is being handled. A concurrent request with
  the same key gets 409 ``idempotency_in_progress``. If the API process dies before creating a task,
  the record expires after ``PENDING_SECONDS`` and the client's retry starts afresh.
- ``done`` (kept ``IDEMPOTENCY_TTL`` seconds, 24 h by default): written in the same Redis transaction that
  creates the task (``JobStore.create(also_set=...)``), so a task never exists without it. A replay gets
  the original response with ``Idempotent-Replayed: true``; the same key with another body gets 422
  ``idempotency_key_reused``.

A request rejected before its task is created gives its key back (``release``), so the client can
correct the body and retry with the same key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import redis

from services.errors import IdempotencyConflict, IdempotencyKeyReused, InvalidRequest
from services.keys import Keys
from services.redis_errors import mapped_redis_errors
from services.replication import NO_REPLICA_ACK, ReplicaAck
from services.serialization import dumps

PENDING_SECONDS = 60
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Replay:
    """The response first given for this key."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """This request holds the key; ``done_record`` is what to store with the task it creates."""

    redis_key: str
    body_hash: str
    ttl: int

    def done_record(self, status: int, body: dict[str, Any]) -> tuple[str, str, int]:
        record = {"state": "done", "body_hash": self.body_hash, "status": status, "body": body}
        return self.redis_key, dumps(record), self.ttl


class IdempotencyStore:
    def __init__(
        self, client: redis.Redis, keys: Keys, ttl: int, *, replica_ack: ReplicaAck = NO_REPLICA_ACK
    ) -> None:
        self._redis = client
        self._keys = keys
        self._ttl = ttl
        self._replica_ack = replica_ack

    def claim(self, key: str, *, scope: str, body: bytes) -> Claim | Replay:
        """Take ``key`` for this request, or return the response already given for it."""
        if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters",
                code="invalid_idempotency_key",
                field="Idempotency-Key",
            )
        digest = hashlib.sha256(key.encode()).hexdigest()
        scope_digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
        redis_key = self._keys.idempotency(scope_digest, digest)
        body_hash = hashlib.sha256(body).hexdigest()
        pending = dumps({"state": "pending", "body_hash": body_hash})
        with mapped_redis_errors():
            if self._redis.set(redis_key, pending, nx=True, ex=PENDING_SECONDS):
                return Claim(redis_key, body_hash, self._ttl)
            raw = self._redis.get(redis_key)
        if raw is None:  # expired between the two calls: rare; let the client retry
            raise IdempotencyConflict(
                "a request with this Idempotency-Key just finished; retry", field="Idempotency-Key"
            )
        record = json.loads(raw)
        if record["body_hash"] != body_hash:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with a different request body", field="Idempotency-Key"
            )
        if record["state"] == "pending":
            raise IdempotencyConflict(
                "a request with this Idempotency-Key is still being handled", field="Idempotency-Key"
            )
        if self._replica_ack.replicas:
            self._replicated(redis_key, raw)
        return Replay(record["status"], record["body"])

    def _replicated(self, redis_key: str, record: bytes | str) -> None:
        """Before a replay is answered, its record (and so its task, written in the same step) must be on
        enough replicas, like the first answer (``services/replication.py``): the first request may have
        got a 503 because it was not yet. WAIT counts this connection's writes, so the record is written
        again as it is (its TTL kept; XX: never brought back once expired), then waited for."""
        with mapped_redis_errors():
            _, acknowledged = self._replica_ack.write(
                self._redis, lambda pipe: pipe.set(redis_key, record, xx=True, keepttl=True)
            )
        self._replica_ack.require(int(acknowledged))

    def release(self, claim: Claim) -> None:
        """Give the key back after a request was rejected before it created anything."""
        with mapped_redis_errors():
            self._redis.delete(claim.redis_key)
