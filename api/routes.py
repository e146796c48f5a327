"""The endpoints. Each one reads HTTP, calls services, and writes HTTP; no domain logic lives here."""

from __future__ import annotations

import hmac
import json
import logging

from flask import Blueprint, current_app, jsonify, redirect, request

from api.openapi import openapi_document
from services.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RequestError,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)
from services.idempotency import Claim, Replay
from services.queue import generation_message
from services.runtime import Runtime
from services.task_view import task_links, task_view
from services.validation import Limits, validate_submission

log = logging.getLogger(__name__)

blueprint = Blueprint("api", __name__)


def _runtime() -> Runtime:
    return current_app.extensions["runtime"]


@blueprint.before_request
def authenticate() -> None:
    config = _runtime().config
    if not config.auth_required or not request.path.startswith("/v1/"):
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, key) for key in config.api_keys):
        raise Unauthorized("a valid 'Authorization: Bearer <key>' header is required", field="Authorization")


@blueprint.post("/v1/images/generations")
def submit():
    rt = _runtime()
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.mimetype or 'missing'!r}",
            field="Content-Type",
        )
    raw = _read_body(rt.config.max_body_bytes)
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return _accepted(*_accept(rt, raw, None))
    claim = rt.idempotency.claim(key, scope=request.headers.get("Authorization", ""), body=raw)
    if isinstance(claim, Replay):
        response = _accepted(claim.status, claim.body)
        response.headers["Idempotent-Replayed"] = "true"
        return response
    try:
        return _accepted(*_accept(rt, raw, claim))
    except RequestError:
        # Rejected before anything was stored: the client may fix the body and reuse the key. (On a
        # store error the key is kept: the task may exist; the pending record expires on its own.)
        rt.idempotency.release(claim)
        raise


def _accept(rt: Runtime, raw: bytes, claim: Claim | None) -> tuple[int, dict]:
    """Validate, store and enqueue one submission; return the status and body of the answer.

    The task, its payload and its broker message are written in one transaction (one round trip):
    stored means enqueued. (A message the broker loses later is found by the sweeper: a queued task
    whose message is missing.)
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    limits = Limits(
        max_input_images=rt.config.max_input_images,
        max_inline_image_bytes=rt.config.max_inline_image_bytes,
        allowed_models=rt.config.allowed_models,
    )
    submission = validate_submission(body, limits)
    webhook = rt.webhooks.subscription(submission.webhook_url, submission.webhook_events)
    payload = json.dumps(submission.upstream_body, separators=(",", ":")).encode()

    def answer(task: dict) -> dict:
        links = task_links(task["id"], request.host_url)
        return {"id": task["id"], "status": task["status"], "created_at": task["created_at"], "links": links}

    task = rt.store.create(
        model=submission.model,
        payload=payload,
        metadata=submission.metadata,
        webhook=webhook,
        also_set=(lambda task: claim.done_record(202, answer(task))) if claim else None,
        message=generation_message,
    )
    return 202, answer(task)


def _accepted(status: int, body: dict):
    response = jsonify(body)
    response.status_code = status
    response.headers["Location"] = body["links"]["self"]
    return response


def _read_body(limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` (declared or streamed)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
    chunks, size = [], 0
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
def get_task(task_id: str):
    rt = _runtime()
    task = rt.store.get(task_id)
    deliveries = rt.webhooks.deliveries(task)
    return jsonify(task_view(task, rt.storage, base_url=request.host_url, deliveries=deliveries))


@blueprint.post("/v1/tasks/<task_id>/cancel")
def cancel_task(task_id: str):
    rt = _runtime()
    task = rt.store.cancel(task_id)
    return jsonify(
        task_view(task, rt.storage, base_url=request.host_url, deliveries=rt.webhooks.deliveries(task))
    )


@blueprint.post("/v1/tasks/<task_id>/webhook/redeliver")
def redeliver_webhook(task_id: str):
    rt = _runtime()
    response = jsonify(rt.webhooks.redeliver(rt.store.get(task_id)))
    response.status_code = 202
    return response


@blueprint.get("/v1/tasks/<task_id>/outputs/<int:index>")
def get_output(task_id: str, index: int):
    rt = _runtime()
    outputs = rt.store.get(task_id)["outputs"]
    if not 0 <= index < len(outputs):
        raise NotFound(f"task {task_id!r} has no output {index}", field="index")
    return redirect(rt.storage.presigned_url(outputs[index]["key"]), code=302)


@blueprint.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz():
    rt = _runtime()
    checks: dict[str, str] = {}
    for name, ping in (("redis", rt.store.ping), ("storage", rt.storage.ping)):
        try:
            ping()
            checks[name] = "ok"
        except ServiceError as exc:
            checks[name] = exc.message
    ready = all(value == "ok" for value in checks.values())
    response = jsonify({"status": "ready" if ready else "unavailable", "checks": checks})
    response.status_code = 200 if ready else 503
    return response


@blueprint.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())
