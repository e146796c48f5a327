"""Checking a webhook from the server, with ``standardwebhooks`` (the specification's reference code).

    event = verify_webhook(secret, request.body, request.headers)  # secret: GET /v1/webhooks/secret
    if event.type == "task.succeeded": ...

De-duplicate on ``event.id``: delivery is at least once, and a retried delivery keeps its id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import standardwebhooks
from standardwebhooks.webhooks import EmptyWebhookSecretError

from imagegen.errors import WebhookVerificationError
from imagegen.models import Task


@dataclass(frozen=True)
class WebhookEvent:
    id: str  # the ``webhook-id`` header: the same on every retry of one event
    type: str  # task.running, task.succeeded, task.failed, task.canceled
    task: Task  # as GET /v1/tasks/{id} showed it at that moment
    timestamp: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def verify_webhook(secret: str, body: bytes | str, headers: Mapping[str, str]) -> WebhookEvent:
    """The event, once its signature (by ``secret``, or by any of the signatures sent after a rotation)
    and its timestamp (within 5 minutes) check out; WebhookVerificationError otherwise. ``body``: the
    request's body exactly as received, before any JSON parsing."""
    plain = {name.lower(): value for name, value in headers.items()}
    try:
        payload = standardwebhooks.Webhook(secret).verify(body, plain)
    except standardwebhooks.WebhookVerificationError as exc:
        raise WebhookVerificationError(str(exc)) from None
    except (ValueError, EmptyWebhookSecretError) as exc:
        # an unreadable signature header or body, or a secret that is not whsec_ + base64
        raise WebhookVerificationError(f"not verifiable: {type(exc).__name__}") from None
    try:
        task = Task.from_json(payload["data"])
        when = payload.get("timestamp")
        timestamp = datetime.fromisoformat(when.replace("Z", "+00:00")) if isinstance(when, str) else None
        return WebhookEvent(plain["webhook-id"], payload["type"], task, timestamp, payload)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WebhookVerificationError(f"signed, but not an imagegen event: {type(exc).__name__}") from None
