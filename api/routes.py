"""The endpoints. Each one reads HTTP, calls services, and writes HTTP; no domain logic lives here."""

from __future__ import annotations

import hmac
import logging

from flask import Blueprint, Response, current_app, g, jsonify, redirect, request
from flask.typing import ResponseReturnValue

from api.openapi import openapi_document
from services.errors import NotFound, PayloadTooLarge, ServiceError, Unauthorized, UnsupportedMediaType
from services.records import TaskRecord
from services.runtime import Runtime
from services.task_view import task_view

log = logging.getLogger(__name__)

blueprint = Blueprint("api", __name__)


def _runtime() -> Runtime:
    runtime: Runtime = current_app.extensions["runtime"]  # set by api.app.create_app
    return runtime


@blueprint.before_app_request
def authenticate() -> None:
    """Every ``/v1/`` request needs a key when API_KEYS is set, including one that matches no route: a
    blueprint's ``before_request`` would not run for those, and their 404 or 405 would tell a client
    without a key which paths and methods exist."""
    config = _runtime().config
    if not config.auth_required or not request.path.startswith("/v1/"):
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    matched = [key for _, key in config.api_keys if hmac.compare_digest(token, key)]
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized("a valid 'Authorization: Bearer <key>' header is required", field="Authorization")
    g.api_key = matched[0]


def _idempotency_scope() -> str:
    """Who sent the request: Idempotency-Keys are scoped to it.

    With API_KEYS, the API key (in the header's usual spelling, so ``bearer`` and ``Bearer`` are one
    scope, as they always were one key); without, whatever Authorization header came."""
    api_key: str | None = g.get("api_key")
    return f"Bearer {api_key}" if api_key is not None else request.headers.get("Authorization", "")


@blueprint.post("/v1/images/generations")
def submit() -> Response:
    rt = _runtime()
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.mimetype or 'missing'!r}",
            field="Content-Type",
        )
    accepted = rt.submissions.submit(
        _read_body(rt.config.max_body_bytes),
        idempotency_key=request.headers.get("Idempotency-Key"),
        scope=_idempotency_scope(),
    )
    response = jsonify(accepted.body)
    response.status_code = accepted.status
    response.headers["Location"] = accepted.location
    if accepted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _read_body(limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` (declared or streamed)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    stream = request.environ["wsgi.input"]
    remaining = request.content_length
    while remaining is None or remaining > 0:
        chunk = stream.read(min(65536, remaining) if remaining is not None else 65536)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
        if remaining is not None:
            remaining -= len(chunk)
    return b"".join(chunks)


@blueprint.get("/v1/tasks/<task_id>")
def get_task(task_id: str) -> Response:
    return _task_response(_runtime().store.get(task_id))


@blueprint.post("/v1/tasks/<task_id>/cancel")
def cancel_task(task_id: str) -> Response:
    return _task_response(_runtime().store.cancel(task_id))


def _task_response(task: TaskRecord) -> Response:
    rt = _runtime()
    deliveries = rt.webhooks.deliveries(task)
    return jsonify(task_view(task, rt.storage, base_url=rt.config.public_base_url, deliveries=deliveries))


@blueprint.post("/v1/tasks/<task_id>/webhook/redeliver")
def redeliver_webhook(task_id: str) -> Response:
    rt = _runtime()
    response = jsonify(rt.webhooks.redeliver(rt.store.get(task_id)))
    response.status_code = 202
    return response


@blueprint.get("/v1/tasks/<task_id>/outputs/<int:index>")
def get_output(task_id: str, index: int) -> ResponseReturnValue:
    rt = _runtime()
    outputs = rt.store.get(task_id)["outputs"]
    if not 0 <= index < len(outputs):
        raise NotFound(f"task {task_id!r} has no output {index}", field="index")
    return redirect(rt.storage.presigned_url(outputs[index]["key"]), code=302)


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz() -> Response:
    """Ready (200) or unavailable (503), for anyone: a load balancer, an orchestrator. With the admin key
    (``Authorization: Bearer <ADMIN_API_KEY>``), each check too, in words that name no host or address
    (``services/redis_errors.py``, ``services/storage.py``)."""
    rt = _runtime()
    checks: dict[str, str] = {}
    for name, ping in (("redis", rt.store.ping), ("storage", rt.storage.ping)):
        try:
            ping()
            checks[name] = "ok"
        except ServiceError as exc:
            checks[name] = exc.message
    ready = all(value == "ok" for value in checks.values())
    body: dict[str, object] = {"status": "ready" if ready else "unavailable"}
    if _is_admin(rt.config.admin_api_key):
        body["checks"] = checks
    response = jsonify(body)
    response.status_code = 200 if ready else 503
    return response


def _is_admin(admin_api_key: str | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <admin_api_key>`` (compared in constant time).
    Any other header, however odd its text, is simply not the admin's."""
    if admin_api_key is None:
        return False
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(_utf8(token.strip()), _utf8(admin_api_key))


def _utf8(text: str) -> bytes:
    """Any str as bytes, for compare_digest: headers arrive as latin-1 text, and a variable that is not
    UTF-8 holds surrogates (os.environ's surrogateescape), which plain encode() refuses."""
    return text.encode("utf-8", "surrogatepass")


@blueprint.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document(auth_required=_runtime().config.auth_required))
