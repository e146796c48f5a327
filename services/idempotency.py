"""Idempotent submission: one ``Idempotency-Key`` (per tenant), one task, however often it is sent.

A key moves through two records (``services/keys.py``):

- ``pending`` (SET NX, short-lived, with a token of its own): a request with this key is being handled. A
  concurrent request with the same key gets 409 ``idempotency_in_progress``. If the request never
  creates its task (its API process died, or Redis failed over between the claim and the create), the
  record expires after ``PENDING_SECONDS`` and the client's retry starts afresh. The create writes the
  ``done`` record only if the key still holds that request's own pending record (or nothing): a request
  slower than ``PENDING_SECONDS`` whose key was claimed again meanwhile creates nothing (409), so the
  short expiry never makes two tasks of one key.
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
import secrets
from dataclasses import dataclass
from typing import Any

import redis

from services.errors import IdempotencyConflict, IdempotencyKeyReused, InvalidRequest
from services.keys import Keys
from services.lua import Script
from services.redis_errors import mapped_redis_errors
from services.replication import NO_REPLICA_ACK, ReplicaAck
from services.serialization import dumps

# Short: a claim only has to outlive its request's way from the claim to the create (validation, one
# Redis call), and a claim whose request never creates its task (cut off by a Redis failover: measured,
# every client retrying its key) holds the key this long. Safe however short: the create requires the
# request's own claim (or none) on the key, so a slower request never makes a second task.
PENDING_SECONDS = 3
# KEYS[1]: the idempotency record; ARGV[1]: the pending record a request wrote. Deletes it if it is still
# there (a rejected request gives its key back), and nothing else.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
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
    pending: str  # the pending record this request wrote: the create requires it (or nothing) there

    def done_record(self, status: int, body: dict[str, Any]) -> tuple[str, str, int, str]:
        """(key, record, TTL, the record the key must still hold) for ``JobStore.create(also_set=...)``."""
        record = {"state": "done", "body_hash": self.body_hash, "status": status, "body": body}
        return self.redis_key, dumps(record), self.ttl, self.pending


class IdempotencyStore:
    def __init__(
        self, client: redis.Redis, keys: Keys, ttl: int, *, replica_ack: ReplicaAck = NO_REPLICA_ACK
    ) -> None:
        self._redis = client
        self._keys = keys
        self._ttl = ttl
        self._replica_ack = replica_ack
        self._release = Script(client, _RELEASE, keys=["key"], args=["pending"])

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
        pending = dumps({"state": "pending", "body_hash": body_hash, "token": secrets.token_hex(8)})
        with mapped_redis_errors():
            if self._redis.set(redis_key, pending, nx=True, ex=PENDING_SECONDS):
                return Claim(redis_key, body_hash, self._ttl, pending)
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
        """Give the key back after a request was rejected before it created anything: only the pending
        record this request wrote, never another request's claim of the same key."""
        with mapped_redis_errors():
            self._release(key=claim.redis_key, pending=claim.pending)
