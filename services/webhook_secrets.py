"""Each tenant's webhook signing secret, so that no tenant can sign webhooks for another.

``{p}:t:{t}:whsec`` holds ``current`` and, after a rotation, ``previous`` with ``previous_until`` (ms):
until then webhooks carry both signatures (``services/webhook_signing.py``), so a receiver can switch to
the new secret at its own pace. A tenant's first secret is made when it is first asked for (``GET
/v1/webhooks/secret``, or the first delivery); the tenant ``default`` starts from
``WEBHOOK_SIGNING_SECRET`` when that is set, so a single-team deployment keeps its secret.

The secrets are kept as they are (HMAC needs the key itself): Redis must be protected like the keys.
"""

from __future__ import annotations

from typing import cast

import redis

from services import clock
from services.keys import Keys
from services.lua import Script
from services.redis_errors import mapped_redis_errors
from services.tenants import DEFAULT_TENANT
from services.webhook_signing import generate_secret

# KEYS: the tenant's secrets. ARGV: a new secret, now (ms), the grace (ms), the first secret if none.
# Returns the new current secret.
_ROTATE = """
local current = redis.call('HGET', KEYS[1], 'current') or ARGV[4]
redis.call('HSET', KEYS[1], 'current', ARGV[1], 'previous', current, 'previous_until', ARGV[2] + ARGV[3])
return ARGV[1]
"""


class WebhookSecrets:
    def __init__(
        self, client: redis.Redis, keys: Keys, *, grace_seconds: float, default_secret: str | None
    ) -> None:
        self._redis = client
        self._keys = keys
        self._grace_seconds = grace_seconds
        self._default_secret = default_secret
        self._rotate = Script(
            client, _ROTATE, keys=["secrets"], args=["secret", "now_ms", "grace_ms", "first"]
        )

    def current(self, tenant: str) -> str:
        """The tenant's current secret, made now if it has none."""
        return self.signing_secrets(tenant)[0]

    def signing_secrets(self, tenant: str) -> list[str]:
        """What signs the tenant's webhooks now: the current secret, and the previous one in its grace."""
        key = self._keys.tenant_webhook_secrets(tenant)
        with mapped_redis_errors():
            self._redis.hsetnx(key, "current", self._first(tenant))
            found = cast(
                "list[bytes | None]", self._redis.hmget(key, ["current", "previous", "previous_until"])
            )
        current, previous, until = (value.decode() if value is not None else None for value in found)
        assert current is not None
        if previous and until and int(until) > clock.now_ms():
            return [current, previous]
        return [current]

    def rotate(self, tenant: str) -> dict[str, str]:
        """A new current secret; the old one keeps signing for the grace period."""
        now = clock.now_ms()
        grace = clock.ms(self._grace_seconds)
        with mapped_redis_errors():
            secret = self._rotate(
                secrets=self._keys.tenant_webhook_secrets(tenant),
                secret=generate_secret(),
                now_ms=now,
                grace_ms=grace,
                first=self._first(tenant),
            )
        return {"key": secret.decode(), "previous_valid_until": clock.iso_from_ms(now + grace)}

    def _first(self, tenant: str) -> str:
        if tenant == DEFAULT_TENANT and self._default_secret is not None:
            return self._default_secret
        return generate_secret()
