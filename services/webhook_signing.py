"""Signing webhooks the Standard Webhooks way (https://www.standardwebhooks.com/).

Every request carries three headers:

- ``webhook-id``: the event's id, the same on every retry of that event, so receivers can de-duplicate;
- ``webhook-timestamp``: when this attempt was signed, integer seconds since the epoch (receivers
  refuse messages more than a few minutes off, which stops replays);
- ``webhook-signature``: ``v1,`` + base64 of HMAC-SHA256 over ``{id}.{timestamp}.{body}`` with the
  secret's key (the base64 after ``whsec_``); while a rotated secret is still valid, one signature per
  secret, space-separated (the Standard allows several: a receiver accepts a message if any matches).

The reference implementation (``pip install standardwebhooks``) verifies them:
``Webhook(secret).verify(body, headers)``; the tests check our signatures with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

# The format's prefix, not a secret (bandit's B105 takes any string assigned to a *SECRET* name for one).
SECRET_PREFIX = "whsec_"  # nosec B105


def generate_secret() -> str:
    """A new secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of one message."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secrets_: Sequence[str], msg_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The three headers of one message, signed by each of ``secrets_`` (the current one first)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets_),
    }


def load_or_create_secret(path: Path) -> tuple[str, bool]:
    """The secret kept in ``path`` (created, readable by its owner only, if missing); and whether it was
    created now. Used by ``make run`` when ``WEBHOOK_SIGNING_SECRET`` is unset."""
    try:
        return path.read_text().strip(), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = generate_secret()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it meanwhile
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    return secret, True
