"""The endpoints. Each one reads HTTP, calls services, and writes HTTP; no domain logic lives here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, redirect, request
from flask.typing import ResponseReturnValue

from api.auth import bearer_token, current_tenant, is_admin_key
from api.openapi import openapi_document
from api.waiting import SSE_HEADERS, client_connected, event_stream, last_event_id, requested_wait
from services import logs, metrics
from services.deletion import delete_task
from services.errors import InvalidRequest, NotFound, PayloadTooLarge, ServiceError, UnsupportedMediaType
from services.records import TaskRecord
from services.runtime import Runtime
from services.store import TaskStatus
from services.submission import Accepted
from services.task_list import query_from_params
from services.task_view import task_view
from services.usage import MAX_DAYS
from services.validation import parse_cancel_after

log = logging.getLogger(__name__)

blueprint = Blueprint("api", __name__)


def _runtime() -> Runtime:
    runtime: Runtime = current_app.extensions["runtime"]  # set by api.app.create_app
    return runtime


@blueprint.post("/v1/images/generations")
def submit() -> Response:
    accepted = _accept(_runtime().submissions.submit)
    logs.bind(task_id=accepted.body["id"])
    wait = requested_wait(request.headers.getlist("Prefer"))
    response = None
    if wait is not None and accepted.status == 202:
        try:
            response = _waited(accepted.body["id"], wait, created=True)
        except NotFound:  # a replayed submission whose task was deleted since: the first answer
            pass
    if response is None:
        return _accepted_response(accepted)
    return _with_accepted_headers(response, accepted)


def _accept(submit: Callable[..., Accepted]) -> Accepted:
    """Hand a submission's JSON body and headers (``Idempotency-Key``, ``Cancel-After``) to ``submit``."""
    _require_json()
    return submit(
        _read_body(_runtime().config.max_body_bytes),
        idempotency_key=request.headers.get("Idempotency-Key"),
        tenant=current_tenant(),
        cancel_after=parse_cancel_after(request.headers.get("Cancel-After")),
    )


def _accepted_response(accepted: Accepted) -> Response:
    response = jsonify(accepted.body)
    response.status_code = accepted.status
    return _with_accepted_headers(response, accepted)


def _with_accepted_headers(response: Response, accepted: Accepted) -> Response:
    response.headers["Location"] = accepted.location
    if accepted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _require_json() -> None:
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.mimetype or 'missing'!r}",
            field="Content-Type",
        )


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


@blueprint.post("/v1/batches")
def submit_batch() -> Response:
    """Up to 1,000 submissions, all stored or none (``services/batches.py``)."""
    accepted = _accept(_runtime().submissions.submit_batch)
    logs.bind(batch_id=accepted.body["id"])
    return _accepted_response(accepted)


@blueprint.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    rt = _runtime()
    batch = rt.batches.get(batch_id, tenant=current_tenant())
    return jsonify(rt.batches.view(batch, base_url=rt.config.public_base_url))


@blueprint.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> Response:
    rt = _runtime()
    batch, canceled = rt.batches.cancel(batch_id, tenant=current_tenant())
    rt.cancel_signal.publish(*canceled)  # the workers running their calls cut them off
    return jsonify(rt.batches.view(batch, base_url=rt.config.public_base_url))


@blueprint.get("/v1/tasks")
def list_tasks() -> Response:
    """The caller's tasks, newest first (``services/task_list.py``); webhook deliveries are left out."""
    rt = _runtime()
    page = rt.task_list.page(current_tenant(), query_from_params(request.args.items(multi=True)))
    base_url = rt.config.public_base_url
    data = [task_view(task, rt.storage, base_url=base_url) for task in page.tasks]
    return jsonify({"data": data, "next_cursor": page.next_cursor})


@blueprint.get("/v1/tasks/<task_id>")
def get_task(task_id: str) -> Response:
    wait = requested_wait(request.headers.getlist("Prefer"))
    if wait is not None:
        return _waited(task_id, wait, created=False)
    return _task_response(_runtime().store.get(task_id, tenant=current_tenant()))


# Prefer: wait, and the event stream (services/task_events.py, api/waiting.py) --------------------------
def _waited(task_id: str, wait: int, *, created: bool) -> Response:
    """The task once final or after ``wait`` s: 200 (a submission: 201 final, 202 not yet), with
    ``Preference-Applied``."""
    rt = _runtime()
    connected = client_connected(request.environ)
    task = rt.task_events.wait_final(task_id, tenant=current_tenant(), timeout=wait, connected=connected)
    response = _task_response(task)
    if created:
        response.status_code = 201 if TaskStatus(task["status"]).is_final else 202
    response.headers["Preference-Applied"] = f"wait={wait}"
    response.vary.add("Prefer")
    return response


@blueprint.get("/v1/tasks/<task_id>/events")
def task_events(task_id: str) -> Response:
    rt = _runtime()
    after = last_event_id(request.headers.get("Last-Event-ID"))
    rt.store.get(task_id, tenant=current_tenant())  # 404 before the stream starts
    connected = client_connected(request.environ)
    events = rt.task_events.stream(
        task_id, after=after, heartbeat=rt.config.events_heartbeat, connected=connected
    )
    body = event_stream(events, lambda task: _full_view(rt, task))
    return Response(body, mimetype="text/event-stream", headers=SSE_HEADERS)


# ------------------------------------------------------------------------------------------------------


@blueprint.delete("/v1/tasks/<task_id>")
def delete_task_route(task_id: str) -> Response:
    rt = _runtime()
    delete_task(rt.store, rt.storage, task_id, tenant=current_tenant())
    return Response(status=204)


@blueprint.post("/v1/tasks/<task_id>/cancel")
def cancel_task(task_id: str) -> Response:
    rt = _runtime()
    task = rt.store.cancel(task_id, tenant=current_tenant())
    rt.cancel_signal.publish(task_id)  # the worker running its call cuts it off
    return _task_response(task)


def _task_response(task: TaskRecord) -> Response:
    return jsonify(_full_view(_runtime(), task))


def _full_view(rt: Runtime, task: TaskRecord) -> dict[str, Any]:
    """The task as ``GET /v1/tasks/{id}`` shows it."""
    deliveries = rt.webhooks.deliveries(task)
    view = task_view(task, rt.storage, base_url=rt.config.public_base_url, deliveries=deliveries)
    view["queue_position"] = rt.store.queue_position(task)
    return view


@blueprint.post("/v1/tasks/<task_id>/webhook/redeliver")
def redeliver_webhook(task_id: str) -> Response:
    rt = _runtime()
    response = jsonify(rt.webhooks.redeliver(rt.store.get(task_id, tenant=current_tenant())))
    response.status_code = 202
    return response


@blueprint.get("/v1/tasks/<task_id>/outputs/<int:index>")
def get_output(task_id: str, index: int) -> ResponseReturnValue:
    rt = _runtime()
    outputs = rt.store.get(task_id, tenant=current_tenant())["outputs"]
    if not 0 <= index < len(outputs):
        raise NotFound(f"task {task_id!r} has no output {index}", field="index")
    return redirect(rt.storage.presigned_url(outputs[index]["key"]), code=302)


@blueprint.get("/v1/usage")
def usage() -> Response:
    days = request.args.get("days", "30")
    if not days.isdigit() or not 1 <= int(days) <= MAX_DAYS:
        raise InvalidRequest(f"days must be a whole number from 1 to {MAX_DAYS}", field="days")
    tenant = current_tenant()
    return jsonify({"tenant": tenant, "days": _runtime().usage.daily(tenant, int(days))})


@blueprint.get("/v1/webhooks/secret")
def webhook_secret() -> Response:
    return jsonify({"key": _runtime().webhooks.secrets.current(current_tenant())})


@blueprint.post("/v1/webhooks/secret/rotate")
def rotate_webhook_secret() -> Response:
    return jsonify(_runtime().webhooks.secrets.rotate(current_tenant()))


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
    admin_key = rt.config.admin_api_key
    if admin_key is not None and is_admin_key(bearer_token(request.headers.get("Authorization")), admin_key):
        body["checks"] = checks
    response = jsonify(body)
    response.status_code = 200 if ready else 503
    return response


@blueprint.get("/metrics")
def metrics_endpoint() -> Response:
    """Prometheus's text format: every API process's metrics added up, and the queues read from Redis
    (``services/metrics.py``). Open, like ``/healthz``: it names no tenant, no task and no host."""
    body, content_type = metrics.exposition(request.headers.get("Accept"), [_runtime().queue_metrics])
    return Response(body, content_type=content_type)


@blueprint.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document(auth_required=_runtime().config.auth_required))
