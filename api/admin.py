"""The admin API (``ADMIN_API_KEY``; ``api/auth.py`` checks it): tenants, their limits and their keys.

Changes apply at once on every process: settings and keys live in Redis and are read where they are used.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from services.errors import InvalidRequest
from services.runtime import Runtime
from services.tenants import check_settings, check_tenant_name

blueprint = Blueprint("admin", __name__, url_prefix="/v1/admin")


def _runtime() -> Runtime:
    runtime: Runtime = current_app.extensions["runtime"]
    return runtime


@blueprint.get("/tenants")
def list_tenants() -> Response:
    rt = _runtime()
    tenants = rt.tenants.overview()
    for tenant in tenants:
        today = rt.usage.daily(tenant["tenant"], 1)
        tenant["usage_today"] = today[0] if today else None
    return jsonify({"data": tenants})


@blueprint.put("/tenants/<tenant>")
def put_tenant(tenant: str) -> Response:
    check_tenant_name(tenant)
    body = request.get_json(silent=True)
    if body is None and request.get_data():
        raise InvalidRequest("the body must be JSON", code="invalid_json")
    settings = _runtime().tenants.update(tenant, check_settings(body if body is not None else {}))
    return jsonify({"tenant": tenant, "settings": settings.as_dict()})


@blueprint.post("/tenants/<tenant>/keys")
def create_key(tenant: str) -> Response:
    response = jsonify(_runtime().tenants.create_key(check_tenant_name(tenant)))
    response.status_code = 201
    return response


@blueprint.get("/keys")
def list_keys() -> Response:
    return jsonify({"data": _runtime().tenants.key_records()})


@blueprint.delete("/keys/<key_id>")
def revoke_key(key_id: str) -> Response:
    _runtime().tenants.revoke_key(key_id)
    return Response(status=204)
