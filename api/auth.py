"""Who is calling: every ``/v1/`` request is authenticated before its route runs.

- ``/v1/admin/…`` needs ``ADMIN_API_KEY`` (404 while it is unset: the admin API is off);
- every other ``/v1/`` path needs a tenant's key once keys are required (``API_KEYS`` or
  ``ADMIN_API_KEY`` set; ``services/tenants.py``), and runs as that tenant (``g.tenant``); on an open
  server every caller is the tenant ``default``.

It runs for paths that match no route too (a ``before_app_request``), so a 404 or 405 tells a client
without a key nothing about which paths and methods exist. Whatever a client puts in the header (no
scheme, another scheme, odd case, extra spaces, non-ASCII text, a huge value) is a 401, never a 500.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, current_app, g, request

from services.errors import Forbidden, NotFound, Unauthorized
from services.runtime import Runtime
from services.tenants import DEFAULT_TENANT, MAX_KEY_LENGTH, key_digest

blueprint = Blueprint("auth", __name__)

ADMIN_PREFIX = "/v1/admin/"


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme in any case, spaces around
    allowed: only spaces, as RFC 9110 says), or None for anything else."""
    if not header or len(header) > MAX_KEY_LENGTH + 16:
        return None
    parts = [part for part in header.split(" ") if part]
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def current_tenant() -> str:
    tenant: str = g.tenant  # set by authenticate for every /v1/ path but the admin API's
    return tenant


@blueprint.before_app_request
def authenticate() -> None:
    if not request.path.startswith("/v1/"):
        return
    runtime: Runtime = current_app.extensions["runtime"]
    config = runtime.config
    token = bearer_token(request.headers.get("Authorization"))
    if request.path.startswith(ADMIN_PREFIX):
        if config.admin_api_key is None:
            raise NotFound("the admin API is off on this server (ADMIN_API_KEY is unset)")
        if not is_admin_key(token, config.admin_api_key):
            raise Unauthorized(
                "the admin API needs 'Authorization: Bearer <ADMIN_API_KEY>'", field="Authorization"
            )
        return
    if not config.auth_required:
        g.tenant = DEFAULT_TENANT
        return
    tenant = runtime.tenants.tenant_of_key(token) if token is not None else None
    if tenant is None:
        if (
            token is not None
            and config.admin_api_key is not None
            and is_admin_key(token, config.admin_api_key)
        ):
            raise Forbidden("the admin key is for /v1/admin/ only; use a tenant's key", field="Authorization")
        raise Unauthorized("a valid 'Authorization: Bearer <key>' header is required", field="Authorization")
    g.tenant = tenant


def is_admin_key(token: str | None, admin_key: str) -> bool:
    """Constant-time: the digests are compared, so neither length nor content shows in the time."""
    return token is not None and hmac.compare_digest(key_digest(token), key_digest(admin_key))
