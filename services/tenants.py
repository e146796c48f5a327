"""Tenants: who owns a task, the API keys that act for it, and its limits.

A tenant is a name (``check_tenant_name``). Its keys come from two places:

- ``API_KEYS`` (``tenant:key`` pairs; a bare key belongs to ``default``): kept in memory as their SHA-256;
- the admin API (``POST /v1/admin/tenants/{tenant}/keys``): a new random key, shown once; Redis keeps
  only its SHA-256 (``{p}:apikeys``), so a copy of the database holds no usable key. Revoking deletes it,
  and every API process sees that on the next request: a key is looked up on each request, never cached.

A presented key is hashed and looked up by its hash; the stored hash it finds is compared with
``hmac.compare_digest``, so neither step's time depends on how much of a valid key was guessed.

Limits (``TenantSettings``): a tenant's own settings (``PUT /v1/admin/tenants/{tenant}``, kept in
``{p}:tenants``), each falling back to the ``TENANT_*`` variables. The store's scripts read them there
too (``services/store.py`` for ``max_queued`` and ``rate_per_minute`` at submit, ``services/admission.py``
for ``max_concurrency`` and ``weight``), so a change applies at once on every process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis

from services import clock
from services.errors import InvalidRequest, NotFound
from services.keys import Keys
from services.records import TaskRecord
from services.redis_errors import mapped_redis_errors
from services.serialization import dumps

DEFAULT_TENANT = "default"
KEY_PREFIX = "iqk_"
_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_KEY_ID = re.compile(r"key_[0-9a-f]{16}")
MAX_KEY_LENGTH = 256


def check_tenant_name(name: str) -> str:
    """A tenant's name: 1 to 63 of a-z, 0-9, ``_`` and ``-``, starting with a letter or digit."""
    if not _TENANT_NAME.fullmatch(name):
        raise InvalidRequest(
            "a tenant name is 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
            code="invalid_tenant",
            field="tenant",
        )
    return name


def tenant_of(task: TaskRecord) -> str:
    """The tenant that owns ``task`` (a record written before tenants existed: ``default``)."""
    return task.get("tenant") or DEFAULT_TENANT


def key_digest(key: str) -> str:
    """The SHA-256 (hex) an API key is known by. Any text can be hashed: a header arrives as latin-1
    text, and a variable that is not UTF-8 holds surrogates (os.environ's surrogateescape)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TenantSettings:
    """A tenant's limits; 0 means none (``max_queued``, ``max_concurrency``, ``rate_per_minute``)."""

    max_concurrency: int
    max_queued: int
    rate_per_minute: float
    weight: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# field -> (number type, smallest allowed, largest allowed)
_SETTINGS_FIELDS: dict[str, tuple[type, float, float]] = {
    "max_concurrency": (int, 0, 1_000_000),
    "max_queued": (int, 0, 100_000_000),
    "rate_per_minute": (float, 0, 1_000_000),
    "weight": (float, 0.001, 1000),
}


def check_settings(body: Any) -> dict[str, Any]:
    """The settings a ``PUT /v1/admin/tenants/{tenant}`` body changes (all optional; null resets one to
    its default); 400 naming the field otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_body")
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if name not in _SETTINGS_FIELDS:
            allowed = ", ".join(_SETTINGS_FIELDS)
            raise InvalidRequest(f"unknown field {name[:64]!r}; allowed: {allowed}", field=str(name)[:64])
        kind, low, high = _SETTINGS_FIELDS[name]
        if value is None:
            changes[name] = None
            continue
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or (kind is int and not float(value).is_integer()) or not low <= value <= high:
            what = "an integer" if kind is int else "a number"
            raise InvalidRequest(f"{name} must be {what} from {low:g} to {high:g}", field=name)
        changes[name] = kind(value)
    return changes


class Tenants:
    """Tenants' keys and settings, in Redis and in ``API_KEYS``."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        defaults: TenantSettings,
        static_keys: tuple[tuple[str, str], ...],
    ) -> None:
        self._redis = client
        self._keys = keys
        self.defaults = defaults
        self._static = {key_digest(key): tenant for tenant, key in static_keys}
        self._static_tenants = sorted({tenant for tenant, _ in static_keys})

    # authentication ---------------------------------------------------------------------------------
    def tenant_of_key(self, key: str) -> str | None:
        """The tenant ``key`` acts for, or None if it is no (longer a) valid key."""
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        digest = key_digest(key)
        found: str | None = None
        for stored, tenant in self._static.items():  # every one compared: the time tells nothing
            if hmac.compare_digest(digest, stored):
                found = tenant
        if found is not None or not key.startswith(KEY_PREFIX):
            return found
        with mapped_redis_errors():
            raw = self._redis.hget(self._keys.api_keys, digest)
        if raw is None:
            return None
        record = json.loads(raw)
        if not hmac.compare_digest(digest, record["sha256"]):
            return None
        return cast(str, record["tenant"])

    # keys -------------------------------------------------------------------------------------------
    def create_key(self, tenant: str) -> dict[str, str]:
        """A new key for ``tenant``: ``{"id", "key", "tenant", "created_at"}``; the key is not kept."""
        check_tenant_name(tenant)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        digest = key_digest(key)
        created_at = clock.now_iso()
        record = {"id": key_id, "tenant": tenant, "sha256": digest, "created_at": created_at}
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._keys.api_keys, digest, dumps(record))
            pipe.hset(self._keys.api_key_ids, key_id, digest)
            pipe.execute()
        return {"id": key_id, "key": key, "tenant": tenant, "created_at": created_at}

    def revoke_key(self, key_id: str) -> None:
        """Revoke a key made by the admin API; ``NotFound`` if there is none with that id."""
        if not _KEY_ID.fullmatch(key_id):
            raise NotFound(f"no key with id {key_id[:64]!r}", field="id")
        with mapped_redis_errors():
            digest = self._redis.hget(self._keys.api_key_ids, key_id)
            if digest is None:
                raise NotFound(f"no key with id {key_id!r}", field="id")
            pipe = self._redis.pipeline(transaction=True)
            pipe.hdel(self._keys.api_keys, digest)
            pipe.hdel(self._keys.api_key_ids, key_id)
            pipe.execute()

    def key_records(self) -> list[dict[str, Any]]:
        """Every key made by the admin API, without its hash: ``{"id", "tenant", "created_at"}``."""
        with mapped_redis_errors():
            raw = cast("list[bytes]", self._redis.hvals(self._keys.api_keys))
        records = [json.loads(item) for item in raw]
        return sorted(
            ({name: record[name] for name in ("id", "tenant", "created_at")} for record in records),
            key=lambda record: str(record["created_at"]),
        )

    # settings ---------------------------------------------------------------------------------------
    def settings(self, tenant: str) -> TenantSettings:
        with mapped_redis_errors():
            raw = self._redis.hget(self._keys.tenants, tenant)
        return self._merged(json.loads(raw) if raw else {})

    def update(self, tenant: str, changes: dict[str, Any]) -> TenantSettings:
        """Apply checked ``changes`` (``check_settings``) to ``tenant``'s own settings; creates it."""
        check_tenant_name(tenant)
        key = self._keys.tenants
        with mapped_redis_errors():
            with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(key)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                        raw = pipe.hget(key, tenant)
                        own = json.loads(raw) if raw else {}
                        own.update(changes)
                        own = {name: value for name, value in own.items() if value is not None}
                        pipe.multi()
                        pipe.hset(key, tenant, dumps(own))
                        pipe.execute()
                        return self._merged(own)
                    except redis.WatchError:
                        continue

    def own_settings(self) -> dict[str, dict[str, Any]]:
        """Every tenant's own settings (those set through the admin API)."""
        with mapped_redis_errors():
            raw = cast("dict[bytes, bytes]", self._redis.hgetall(self._keys.tenants))
        return {name.decode(): json.loads(value) for name, value in raw.items()}

    def overview(self) -> list[dict[str, Any]]:
        """Every tenant with its settings, keys and what it has in the queue now."""
        own = self.own_settings()
        records = self.key_records()
        names = sorted(set(self._static_tenants) | set(own) | {record["tenant"] for record in records})
        keys = self._keys
        with mapped_redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.scard(keys.tenant_active(name))
                pipe.zcard(keys.tenant_ready(name))
                pipe.zcard(keys.tenant_admitted(name))
            counts = cast("list[int]", pipe.execute())
        static_counts = {name: list(self._static.values()).count(name) for name in self._static_tenants}
        return [
            {
                "tenant": name,
                "settings": self._merged(own.get(name, {})).as_dict(),
                "own_settings": own.get(name, {}),
                "keys": static_counts.get(name, 0) + sum(1 for record in records if record["tenant"] == name),
                "unfinished": counts[3 * index],
                "waiting": counts[3 * index + 1],
                "admitted": counts[3 * index + 2],
            }
            for index, name in enumerate(names)
        ]

    def _merged(self, own: dict[str, Any]) -> TenantSettings:
        merged = {**self.defaults.as_dict(), **own}
        return TenantSettings(**{name: merged[name] for name in _SETTINGS_FIELDS})
