"""Tenants: who owns a task, their API keys and their limits."""

from __future__ import annotations

import re

from services.errors import InvalidRequest

DEFAULT_TENANT = "default"
_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def check_tenant_name(name: str) -> str:
    """A tenant's name: 1 to 63 of a-z, 0-9, ``_`` and ``-``, starting with a letter or digit."""
    if not _TENANT_NAME.fullmatch(name):
        raise InvalidRequest(
            "a tenant name is 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
            code="invalid_tenant",
            field="tenant",
        )
    return name
