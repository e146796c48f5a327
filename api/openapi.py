"""The OpenAPI 3 document of every endpoint, served at ``/openapi.json``.

tests/test_openapi.py validates the document and checks real responses against it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from services.task_list import MAX_METADATA_FILTERS, MAX_METADATA_KEY, MAX_METADATA_VALUE
from services.usage import FIELDS as USAGE_FIELDS
from services.usage import MAX_DAYS as USAGE_MAX_DAYS
from services.validation import (
    ASPECT_RATIOS,
    BATCH_EVENTS,
    IMAGE_SIZES,
    INPUT_MIME_TYPES,
    MAX_BATCH_REQUESTS,
    MAX_METADATA_DEPTH,
    MAX_MODEL_LENGTH,
    MAX_WEBHOOK_URL_LENGTH,
    MODEL_NAME,
    PRIORITIES,
    RESPONSE_MODALITIES,
    WEBHOOK_EVENTS,
)

_STATUSES = ["queued", "running", "succeeded", "failed", "canceled"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Allow null; an enum must then list null itself (OpenAPI 3.0.3)."""
    if "enum" in schema:
        return {**schema, "nullable": True, "enum": [*schema["enum"], None]}
    return {**schema, "nullable": True}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _unavailable(description: str) -> dict[str, Any]:
    """A 503: the error format and ``Retry-After`` (api/errors.py)."""
    return _retry_later(description)


def _retry_later(description: str) -> dict[str, Any]:
    """A 429 or 503: the error format and ``Retry-After`` (api/errors.py)."""
    return _json(
        _ref("Error"),
        description,
        {
            "Retry-After": {
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
                "description": "seconds",
            }
        },
    )


_UNAUTHORIZED = "Missing or wrong API key (only when the server requires API keys: API_KEYS)"


_TIME = {"type": "string", "format": "date-time"}
_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"

_TASK_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["code", "message", "retryable", "upstream_status"],
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "retryable": {"type": "boolean"},
        "upstream_status": _nullable({"type": "integer"}),
    },
}

_WEBHOOK: dict[str, Any] = {
    "type": "object",
    "description": "The task's webhook (never the signing secret) and the log of its deliveries.",
    "required": ["url", "events", "deliveries"],
    "properties": {
        "url": {"type": "string", "description": "the webhook_url as submitted"},
        "events": {"type": "array", "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)}},
        "deliveries": {"type": "array", "items": _ref("WebhookDelivery")},
    },
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "field"],
                "properties": {
                    "code": {"type": "string", "description": "machine-readable, e.g. invalid_field"},
                    "message": {"type": "string"},
                    "field": _nullable({"type": "string", "description": "JSON path of the offending field"}),
                },
            }
        },
    },
    "Part": {
        "type": "object",
        "description": "A text part or an inline image (snake_case or camelCase key): exactly one of them.",
        "properties": {
            "text": {"type": "string", "minLength": 1},
            "inline_data": _ref("InlineData"),
            "inlineData": _ref("InlineData"),
        },
        "oneOf": [{"required": ["text"]}, {"required": ["inline_data"]}, {"required": ["inlineData"]}],
    },
    "InlineData": {
        "type": "object",
        "description": "An input image: its MIME type (one spelling) and its bytes as standard base64.",
        "properties": {
            "mime_type": {"type": "string", "enum": sorted(INPUT_MIME_TYPES)},
            "mimeType": {"type": "string", "enum": sorted(INPUT_MIME_TYPES)},
            "data": {
                "type": "string",
                "format": "byte",
                "minLength": 4,
                "pattern": _BASE64,
                "description": "padded standard base64, no whitespace, no data: prefix",
            },
        },
        "required": ["data"],
        "oneOf": [{"required": ["mime_type"]}, {"required": ["mimeType"]}],
    },
    "GenerationRequest": {
        "type": "object",
        "description": "The upstream's own request body plus our top-level options, which are stripped "
        "before forwarding. Other upstream fields (safetySettings, systemInstruction, ...) pass through. "
        "The snake_case spellings (generation_config, response_modalities, ...) are accepted too, and so "
        "are lowercase modalities; a field may be given in one spelling only.",
        "required": ["model", "contents", "generationConfig"],
        "additionalProperties": True,
        "properties": {
            "model": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_MODEL_LENGTH,
                "pattern": f"^{MODEL_NAME.pattern}$",
                "example": "gemini-2.5-flash-image",
                "description": "a model name: letters, digits and . _ - / : @; with ALLOWED_MODELS, one of "
                "those",
            },
            "contents": {
                "type": "array",
                "minItems": 1,
                "description": "At most MAX_INPUT_IMAGES (14) inline images in all.",
                "items": {
                    "type": "object",
                    "required": ["parts"],
                    "properties": {
                        "role": {"type": "string"},
                        "parts": {"type": "array", "minItems": 1, "items": _ref("Part")},
                    },
                },
            },
            "generationConfig": {
                "type": "object",
                "required": ["responseModalities", "imageConfig"],
                "properties": {
                    "responseModalities": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "enum": list(RESPONSE_MODALITIES)},
                        "not": {"items": {"enum": ["TEXT"]}},
                        "description": "Must include IMAGE.",
                    },
                    "imageConfig": {
                        "type": "object",
                        "required": ["aspectRatio", "imageSize"],
                        "properties": {
                            "aspectRatio": {"type": "string", "enum": list(ASPECT_RATIOS)},
                            "imageSize": {"type": "string", "enum": list(IMAGE_SIZES)},
                        },
                    },
                },
            },
            "metadata": _nullable(
                {
                    "type": "object",
                    "description": "Echoed back on the task; at most 4096 bytes as compact JSON, objects "
                    f"and arrays nested at most {MAX_METADATA_DEPTH} levels deep (this one included).",
                }
            ),
            "webhook_url": {
                "type": "string",
                "maxLength": MAX_WEBHOOK_URL_LENGTH,
                "pattern": "^https?://[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)*(:[1-9][0-9]{0,3})?(/[!-~]*)?$",
                "description": "Where signed webhooks are POSTed (Standard Webhooks). https; plain http only "
                "with WEBHOOK_ALLOW_HTTP; never loopback, private, link-local or metadata addresses unless "
                "WEBHOOK_ALLOW_PRIVATE (metadata addresses never).",
            },
            "webhook_events": _nullable(
                {
                    "type": "array",
                    "minItems": 1,
                    "uniqueItems": True,
                    "description": "Only with webhook_url. Default: succeeded, failed, canceled.",
                    "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                }
            ),
            "priority": _nullable(
                {
                    "type": "string",
                    "enum": list(PRIORITIES),
                    "description": "Its order among its tenant's waiting tasks (default normal): high before "
                    "every normal task still waiting; low after normal ones for at most 10 minutes, then in "
                    "turn (it ages). Tenants share the upstream by weight whatever their tasks' priority.",
                }
            ),
        },
        # webhook_events needs webhook_url
        "anyOf": [{"not": {"required": ["webhook_events"]}}, {"required": ["webhook_url"]}],
    },
    "Links": {
        "type": "object",
        "required": ["self"],
        "properties": {"self": {"type": "string", "format": "uri"}},
    },
    "Accepted": {
        "type": "object",
        "required": ["id", "status", "created_at", "links"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": ["queued"]},
            "created_at": _TIME,
            "links": _ref("Links"),
        },
    },
    "AcceptedOrTask": {
        "description": "`Accepted`; with `Prefer: wait`, the whole `Task`",
        "anyOf": [_ref("Accepted"), _ref("Task")],
    },
    "Attempt": {
        "type": "object",
        "required": ["number", "started_at", "finished_at", "outcome", "upstream_status", "error_code"],
        "properties": {
            "number": {"type": "integer", "minimum": 1},
            "started_at": _TIME,
            "finished_at": _nullable(_TIME),
            "outcome": _nullable(
                {"type": "string", "enum": ["succeeded", "failed", "retry", "worker_lost", "canceled"]}
            ),
            "upstream_status": _nullable({"type": "integer"}),
            "error_code": _nullable({"type": "string"}),
            "duration_ms": _nullable({"type": "integer"}),
        },
    },
    "Output": {
        "type": "object",
        "required": ["index", "url", "bucket", "key", "mime_type", "bytes", "width", "height", "sha256"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "url": {"type": "string", "format": "uri", "description": "presigned GET, signed on every read"},
            "bucket": {"type": "string"},
            "key": {"type": "string"},
            "mime_type": {"type": "string"},
            "bytes": {"type": "integer"},
            "width": _nullable({"type": "integer"}),
            "height": _nullable({"type": "integer"}),
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
    },
    "TaskError": _TASK_ERROR,
    "Task": {
        "type": "object",
        "required": [
            "id",
            "status",
            "model",
            "created_at",
            "started_at",
            "finished_at",
            "attempts",
            "outputs",
            "text",
            "usage",
            "metadata",
            "error",
            "links",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": _STATUSES},
            "batch_id": _nullable({"type": "string", "description": "the batch it was submitted in"}),
            "priority": {"type": "string", "enum": list(PRIORITIES)},
            "deadline_at": _nullable({**_TIME, "description": "from Cancel-After"}),
            "model": {"type": "string"},
            "created_at": _TIME,
            "started_at": _nullable(_TIME),
            "finished_at": _nullable(_TIME),
            "next_attempt_at": _nullable(_TIME),
            "attempts": {"type": "array", "items": _ref("Attempt")},
            "outputs": {"type": "array", "items": _ref("Output")},
            "text": {"type": "array", "items": {"type": "string"}},
            "usage": _nullable({"type": "object", "description": "the upstream's usage metadata"}),
            "metadata": _nullable({"type": "object"}),
            "error": _nullable(_TASK_ERROR),
            "webhook": _nullable(_WEBHOOK),
            "queue_position": _nullable(
                {
                    "type": "integer",
                    "minimum": 0,
                    "description": "`GET /v1/tasks/{id}` of a queued task: 0 once it is handed to the "
                    "workers (it starts as soon as one is free); else 1 + how many of its tenant's tasks "
                    "wait ahead of it (other tenants share the places by weight). null when not queued, or "
                    "waiting for a retry",
                }
            ),
            "links": _ref("Links"),
        },
    },
    "Webhook": _WEBHOOK,
    "WebhookDelivery": {
        "type": "object",
        "description": "One delivery attempt of one event, oldest first (the last 50 are kept).",
        "required": [
            "webhook_id",
            "event",
            "attempt",
            "attempted_at",
            "status_code",
            "error",
            "duration_ms",
            "outcome",
            "next_retry_at",
        ],
        "properties": {
            "webhook_id": {"type": "string", "description": "the webhook-id header: same on every retry"},
            "event": {"type": "string", "enum": list(BATCH_EVENTS)},
            "attempt": {"type": "integer", "minimum": 1},
            "attempted_at": _TIME,
            "status_code": _nullable({"type": "integer", "description": "the receiver's HTTP status"}),
            "error": _nullable({"type": "string", "description": "timeout, connection error, refusal"}),
            "duration_ms": {"type": "integer", "minimum": 0},
            "outcome": {
                "type": "string",
                "enum": ["delivered", "failed", "given_up", "gone", "refused"],
                "description": "failed: retried at next_retry_at; given_up: the schedule is exhausted; "
                "gone: the receiver answered 410; refused: the address is not allowed",
            },
            "next_retry_at": _nullable(_TIME),
        },
    },
    "Redelivery": {
        "type": "object",
        "required": ["task_id", "webhook_id", "event", "status"],
        "properties": {
            "task_id": {"type": "string", "format": "uuid"},
            "webhook_id": {"type": "string"},
            "event": {"type": "string", "enum": [f"task.{event}" for event in WEBHOOK_EVENTS]},
            "status": {"type": "string", "enum": ["pending"]},
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "BatchRequest": {
        "type": "object",
        "description": "Up to 1,000 generation requests, every one validated before any is stored, all "
        "stored or none. A request may set its own `webhook_url`, `metadata` and `priority`.",
        "required": ["requests"],
        "additionalProperties": False,
        "properties": {
            "requests": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH_REQUESTS,
                "items": _ref("GenerationRequest"),
            },
            "metadata": _nullable({"type": "object", "description": "the batch's own, like a task's"}),
            "webhook_url": _nullable({"type": "string", "format": "uri"}),
            "webhook_events": _nullable(
                {
                    "type": "array",
                    "items": {"type": "string", "enum": list(BATCH_EVENTS)},
                    "uniqueItems": True,
                    "description": "default `[batch.completed]`. `batch.completed` is sent once, when every "
                    "task is final; each `task.*` event is sent for every task whose request has no "
                    "`webhook_url` of its own",
                }
            ),
        },
        "anyOf": [{"not": {"required": ["webhook_events"]}}, {"required": ["webhook_url"]}],
    },
    "BatchAccepted": {
        "type": "object",
        "required": ["id", "object", "status", "created_at", "task_ids", "links"],
        "properties": {
            "id": {"type": "string", "pattern": "^batch_[0-9a-f]{32}$"},
            "object": {"type": "string", "enum": ["batch"]},
            "status": {"type": "string", "enum": ["in_progress"]},
            "created_at": _TIME,
            "task_ids": {"type": "array", "items": {"type": "string", "format": "uuid"}},
            "links": _ref("BatchLinks"),
        },
    },
    "BatchLinks": {
        "type": "object",
        "required": ["self", "tasks"],
        "properties": {
            "self": {"type": "string", "format": "uri"},
            "tasks": {"type": "string", "format": "uri", "description": "its tasks: GET /v1/tasks?batch_id="},
        },
    },
    "Batch": {
        "type": "object",
        "required": [
            "id",
            "object",
            "status",
            "created_at",
            "completed_at",
            "cancel_requested_at",
            "metadata",
            "counts",
            "task_ids",
            "webhook",
            "links",
        ],
        "properties": {
            "id": {"type": "string", "pattern": "^batch_[0-9a-f]{32}$"},
            "object": {"type": "string", "enum": ["batch"]},
            "status": {
                "type": "string",
                "enum": ["in_progress", "completed", "canceling", "canceled"],
                "description": "completed (canceled, after a cancel) once every task is final",
            },
            "created_at": _TIME,
            "completed_at": _nullable({**_TIME, "description": "when its last task finished"}),
            "cancel_requested_at": _nullable(_TIME),
            "metadata": _nullable({"type": "object"}),
            "counts": {
                "type": "object",
                "description": "its tasks by status, exact: they move in the same atomic step as each "
                "task's change (a deleted task stays counted)",
                "required": ["total", *_STATUSES],
                "properties": {name: {"type": "integer", "minimum": 0} for name in ["total", *_STATUSES]},
            },
            "task_ids": {"type": "array", "items": {"type": "string", "format": "uuid"}},
            "webhook": _nullable(
                {
                    "type": "object",
                    "required": ["url", "events", "deliveries"],
                    "properties": {
                        "url": {"type": "string"},
                        "events": {"type": "array", "items": {"type": "string", "enum": list(BATCH_EVENTS)}},
                        "deliveries": {"type": "array", "items": _ref("WebhookDelivery")},
                    },
                }
            ),
            "links": _ref("BatchLinks"),
        },
    },
    "TaskPage": {
        "type": "object",
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": _ref("Task")},
            "next_cursor": {"type": "string", "nullable": True, "description": "null: the last page"},
        },
    },
    "Usage": {
        "type": "object",
        "required": ["tenant", "days"],
        "properties": {
            "tenant": {"type": "string"},
            "days": {
                "type": "array",
                "description": "newest first; days without any count are left out",
                "items": {
                    "type": "object",
                    "required": ["date", *USAGE_FIELDS],
                    "properties": {
                        "date": {"type": "string", "format": "date"},
                        **{name: {"type": "integer", "minimum": 0} for name in USAGE_FIELDS},
                    },
                },
            },
        },
    },
    "WebhookSecret": {
        "type": "object",
        "required": ["key"],
        "properties": {
            "key": {"type": "string", "pattern": "^whsec_", "description": "verify webhooks with it"},
            "previous_valid_until": {
                **_TIME,
                "description": "after a rotation: until then webhooks are signed by the old secret too",
            },
        },
    },
    "TenantSettings": {
        "type": "object",
        "additionalProperties": False,
        "description": "all optional; null resets one to the server's default (the TENANT_* variables)",
        "properties": {
            "max_concurrency": {"type": "integer", "minimum": 0, "nullable": True},
            "max_queued": {"type": "integer", "minimum": 0, "nullable": True},
            "rate_per_minute": {"type": "number", "minimum": 0, "nullable": True},
            "weight": {"type": "number", "minimum": 0.001, "maximum": 1000, "nullable": True},
        },
    },
    "Tenant": {
        "type": "object",
        "required": ["tenant", "settings"],
        "properties": {"tenant": {"type": "string"}, "settings": _ref("TenantSettings")},
    },
    "TenantList": {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": {"type": "object"}}},
    },
    "ApiKey": {
        "type": "object",
        "required": ["id", "tenant", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "tenant": {"type": "string"},
            "created_at": _TIME,
            "key": {"type": "string", "description": "only when created: it is not kept, only its hash"},
        },
    },
    "ApiKeyList": {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": _ref("ApiKey")}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable"]},
            "checks": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Only with `Authorization: Bearer <ADMIN_API_KEY>`: each dependency, `ok` or "
                "what failed (never a host or an address).",
                "example": {"redis": "the task store is unavailable (ConnectionError)", "storage": "ok"},
            },
        },
    },
}

_IDEMPOTENCY_KEY = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]([ -~]*[!-~])?$"}
_CANCEL_AFTER = {"type": "string", "pattern": "^[0-9]{1,9}(\\.[0-9]{1,3})?(ms|s|m|h)$"}


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": schema}


# What both submissions (one job, a batch) may answer besides 400, 429 and 503
_SUBMIT_ERRORS: dict[str, Any] = {
    "401": _error(_UNAUTHORIZED),
    "409": _error("A request with this Idempotency-Key is still being handled"),
    "413": _error("Body over the configured limit (MAX_BODY_BYTES)"),
    "415": _error("Content-Type is not application/json"),
    "422": _error("This Idempotency-Key was used with a different body"),
}
_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}

# Prefer: wait (RFC 7240; api/waiting.py, services/task_events.py)
_PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "`wait=N` (or `wait` alone: 60): hold the answer until the task is final or N seconds "
    "pass, N at most 60 (more is taken as 60). `wait=0` (no wait) and a value that is not a whole number "
    "of seconds are ignored, as are other preferences: the usual answer, without `Preference-Applied`. "
    "`Preference-Applied` says which wait was applied.",
    "schema": {"type": "string"},
    "example": "wait=30",
}
_PREFERENCE_APPLIED = {
    "Preference-Applied": {
        "schema": {"type": "string", "pattern": "^wait=[0-9]+$"},
        "description": "with `Prefer: wait`: the wait applied, e.g. `wait=60`",
    }
}

# Links (OpenAPI 3.0): what a client can do next with the task a submission created. (Only from there: a
# task's other responses name the same id.)
_TASK_LINKS: dict[str, Any] = {
    "GetTask": {"operationId": "getTask", "parameters": {"task_id": "$response.body#/id"}},
    "CancelTask": {"operationId": "cancelTask", "parameters": {"task_id": "$response.body#/id"}},
    "RedeliverWebhook": {"operationId": "redeliverWebhook", "parameters": {"task_id": "$response.body#/id"}},
    "GetFirstOutput": {
        "operationId": "getOutput",
        "parameters": {"task_id": "$response.body#/id", "index": 0},
        "description": "once the task has succeeded",
    },
}


_SUBMIT_EXAMPLE: dict[str, Any] = {
    "model": "gemini-2.5-flash-image",
    "contents": [{"role": "user", "parts": [{"text": "A llama in a meadow at dawn"}]}],
    "generationConfig": {
        "responseModalities": ["TEXT", "IMAGE"],
        "imageConfig": {"aspectRatio": "1:1", "imageSize": "1K"},
    },
    "metadata": {"order": 42},
}

_SUBMIT_HEADERS: dict[str, Any] = {
    "Location": {"required": True, "schema": {"type": "string"}, "description": "the task's URL"},
    "Idempotent-Replayed": {
        "schema": {"type": "string", "enum": ["true"]},
        "description": "present on a replay of an Idempotency-Key",
    },
}

_STRING: dict[str, Any] = {"schema": {"type": "string"}}
_OPEN: dict[str, Any] = {"security": []}  # health checks, metrics, this document and its page: no key
_ADMIN: dict[str, Any] = {"security": [{"admin": []}]}  # ADMIN_API_KEY, whether tenants need keys or not
_ADMIN_ERRORS: dict[str, Any] = {
    "401": _error("Missing or wrong admin key"),
    "404": _error("The admin API is off (ADMIN_API_KEY is unset), or no such key"),
    "503": _unavailable("The store is unavailable"),
}
_TENANT = {
    "name": "tenant",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
}

_PATHS: dict[str, Any] = {
    "/v1/images/generations": {
        "post": {
            "summary": "Submit a generation job",
            "operationId": "submitGeneration",
            "parameters": [
                _header(
                    "Idempotency-Key",
                    "1 to 255 printable characters, scoped to the API key, kept 24 h: the same key and body "
                    "return the original task with `Idempotent-Replayed: true`.",
                    _IDEMPOTENCY_KEY,
                ),
                _header(
                    "Cancel-After",
                    "A deadline: a number (up to 3 decimals) and a unit, `ms`, `s`, `m` or `h`, e.g. "
                    "`1500ms`, `30s`, `1.5m`, `2h`; more than 0, at most `168h` (7 days). A task not final "
                    "by then is canceled with `error.code = deadline_exceeded`, its call cut off; one still "
                    "waiting then never calls the upstream.",
                    _CANCEL_AFTER,
                ),
                _PREFER,
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _ref("GenerationRequest"), "example": _SUBMIT_EXAMPLE}
                },
            },
            "responses": {
                "201": {
                    **_json(
                        _ref("Task"),
                        "With `Prefer: wait`: the task became final within the wait; the whole task, as "
                        "`GET /v1/tasks/{id}` shows it",
                        {**_SUBMIT_HEADERS, **_PREFERENCE_APPLIED},
                    ),
                    "links": _TASK_LINKS,
                },
                "202": {
                    **_json(
                        _ref("AcceptedOrTask"),
                        "Accepted and queued (or, for a replayed Idempotency-Key, the first answer). With "
                        "`Prefer: wait`, not final within the wait: the whole task as it is then",
                        {**_SUBMIT_HEADERS, **_PREFERENCE_APPLIED},
                    ),
                    "links": _TASK_LINKS,
                },
                "400": _error("Invalid JSON, body or field"),
                **_SUBMIT_ERRORS,
                "429": _retry_later(
                    "`tenant_queue_full`: the tenant has max_queued unfinished tasks; `rate_limited`: it "
                    "submits faster than its rate_per_minute"
                ),
                "503": _unavailable("The store or the queue is unavailable; nothing was accepted"),
            },
        }
    },
    "/v1/batches": {
        "post": {
            "summary": "Submit up to 1,000 generation jobs at once, all or none",
            "description": "Every request is validated first (an error's `field` names its request: "
            "`requests[3].model`); then the batch and all its tasks are stored in one atomic step, within "
            "the tenant's `max_queued` as a whole (a batch counts as one request for `rate_per_minute`). "
            "`Cancel-After` applies to each task. Each task is a task like any other (`GET /v1/tasks/{id}`, "
            "its own cancel), with `batch_id` set.",
            "operationId": "submitBatch",
            "parameters": [
                _header(
                    "Idempotency-Key",
                    "As for a single job: the same key and body return the same batch.",
                    _IDEMPOTENCY_KEY,
                ),
                _header(
                    "Cancel-After", "A deadline for each of its tasks, as for a single job.", _CANCEL_AFTER
                ),
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("BatchRequest")}},
            },
            "responses": {
                "202": _json(
                    _ref("BatchAccepted"),
                    "Stored and queued, every task (or, for a replayed Idempotency-Key, the first answer)",
                    {"Location": {**_STRING, "description": "the batch's URL"}},
                ),
                "400": _error("Invalid JSON, body or field, in the batch or in one of its requests"),
                **_SUBMIT_ERRORS,
                "429": _retry_later(
                    "`tenant_queue_full`: the batch's tasks would pass the tenant's max_queued; "
                    "`rate_limited`: it submits faster than its rate_per_minute. Nothing was stored"
                ),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/batches/{batch_id}": {
        "get": {
            "summary": "A batch: its status, counts by status, completed_at",
            "operationId": "getBatch",
            "parameters": [_BATCH_ID],
            "responses": {
                "200": _json(_ref("Batch"), "The batch"),
                "401": _error(_UNAUTHORIZED),
                "404": _error("No such batch"),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/batches/{batch_id}/cancel": {
        "post": {
            "summary": "Cancel every unfinished task of a batch",
            "description": "Its queued tasks are canceled first (none of them starts meanwhile), then its "
            "running ones, whose upstream calls are cut off. Sending it again after an error carries on.",
            "operationId": "cancelBatch",
            "parameters": [_BATCH_ID],
            "responses": {
                "200": _json(_ref("Batch"), "The batch, canceled"),
                "401": _error(_UNAUTHORIZED),
                "404": _error("No such batch"),
                "409": _error("The batch is already completed (invalid_transition)"),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/tasks": {
        "get": {
            "summary": "The caller's tasks, newest first, in pages",
            "description": "Stable cursor paging: tasks created meanwhile never appear in later pages, "
            "and none is skipped or repeated. A page examines at most 1,000 tasks: with a rare "
            "filter it may hold fewer than `limit` and still have a `next_cursor`. Webhook deliveries are "
            "left out (see the task itself).",
            "operationId": "listTasks",
            "parameters": [
                {
                    "name": "status",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": _STATUSES},
                },
                {
                    "name": "batch_id",
                    "in": "query",
                    "required": False,
                    "description": "only the tasks of this batch (read from the batch's own index)",
                    "schema": {"type": "string", "pattern": "^batch_[0-9a-f]{32}$"},
                },
                {
                    "name": "created_after",
                    "in": "query",
                    "required": False,
                    "description": "only tasks created at or after this time (inclusive)",
                    "schema": _TIME,
                },
                {
                    "name": "created_before",
                    "in": "query",
                    "required": False,
                    "description": "only tasks created before this time (exclusive)",
                    "schema": _TIME,
                },
                {
                    # OpenAPI 3.0 cannot name a family of parameters; an exploded form object can: each of
                    # its properties is one parameter of that name (deepObject would be metadata[key]=).
                    "name": "metadata",
                    "in": "query",
                    "required": False,
                    "description": "Filters on the tasks' metadata, each a parameter "
                    "`metadata.<key>=<value>` (the properties of this object are named `metadata.<key>`): "
                    "keeps tasks whose metadata has that key with that value (as JSON text unless a "
                    f"string). Up to {MAX_METADATA_FILTERS}; a key of at most {MAX_METADATA_KEY} "
                    f"characters, a value of at most {MAX_METADATA_VALUE}.",
                    "style": "form",
                    "explode": True,
                    "schema": {
                        "type": "object",
                        "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE},
                        "maxProperties": MAX_METADATA_FILTERS,
                    },
                    "example": {"metadata.order": "42"},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                },
                {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": _json(_ref("TaskPage"), "A page of tasks"),
                "400": _error(
                    "A parameter out of range, unknown or given more than once, or a cursor this server "
                    "did not hand out"
                ),
                "401": _error(_UNAUTHORIZED),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/tasks/{task_id}": {
        "get": {
            "summary": "A task's state, attempts and outputs",
            "operationId": "getTask",
            "parameters": [_TASK_ID, _PREFER],
            "responses": {
                "200": _json(
                    _ref("Task"),
                    "The task (with `Prefer: wait`: once final, or as it is when the wait is over)",
                    _PREFERENCE_APPLIED,
                ),
                "401": _error(_UNAUTHORIZED),
                "404": _error("No such task"),
                "503": _unavailable("The store is unavailable"),
            },
        },
        "delete": {
            "summary": "Delete a final task: its record, payload, webhook events and log, and its images",
            "operationId": "deleteTask",
            "parameters": [_TASK_ID],
            "responses": {
                "204": {"description": "Deleted; the task is 404 from now on"},
                "401": _error(_UNAUTHORIZED),
                "404": _error("No such task"),
                "409": _error("The task is not final (invalid_transition): cancel it first"),
                "503": _unavailable("The store or storage is unavailable; nothing of the record is gone"),
            },
        },
    },
    "/v1/tasks/{task_id}/events": {
        "get": {
            "summary": "Stream the task's status changes (Server-Sent Events)",
            "description": "One event per change of status, numbered from 1 (`queued`) on: `id:` its "
            "number, `event:` the status, `data:` the task as `GET /v1/tasks/{id}` shows it when the event "
            "is sent (so for an event sent late, on a resume or right before the next change, already a "
            "later status). Events that happened before the stream opened are sent first; with "
            "`Last-Event-ID` only those after it, so a client that reconnects misses and repeats nothing. "
            "The stream ends after the final event (at once if it was already sent); an idle stream gets "
            "a comment `: keep-alive` every EVENTS_HEARTBEAT_SECONDS (15).",
            "operationId": "streamTaskEvents",
            "parameters": [
                _TASK_ID,
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "the `id` of the last event the client has (EventSource sends it when it "
                    "reconnects): the stream starts after it. One beyond the task's last event is a 400: "
                    "events are numbered as they happen, so no stream sent it.",
                    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                },
            ],
            "responses": {
                "200": {
                    "description": "The event stream",
                    "content": {
                        "text/event-stream": {
                            "schema": {"type": "string"},
                            "example": 'id: 1\nevent: queued\ndata: {"id": "…", "status": "queued", …}'
                            "\n\n: keep-alive\n\nid: 2\nevent: running\ndata: {…}\n\n"
                            'id: 3\nevent: succeeded\ndata: {…, "outputs": [{…, "url": "…"}]}\n\n',
                        }
                    },
                },
                "400": _error(
                    "Last-Event-ID is not the id of an event of the task (not a number, or beyond its last "
                    "event)"
                ),
                "401": _error(_UNAUTHORIZED),
                "404": _error("No such task"),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/tasks/{task_id}/cancel": {
        "post": {
            "summary": "Cancel a queued or running task",
            "description": "A running attempt's upstream call is cut off (its connection shut down by the "
            "worker running it), so it is not paid for and its slot goes to the next task. A "
            "`task.canceled` webhook is sent if the task asked for that event.",
            "operationId": "cancelTask",
            "parameters": [_TASK_ID],
            "responses": {
                "200": _json(_ref("Task"), "The task, now canceled"),
                "401": _error(_UNAUTHORIZED),
                "404": _error("No such task"),
                "409": _error("The task is already final (invalid_transition)"),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/tasks/{task_id}/webhook/redeliver": {
        "post": {
            "summary": "Send the task's latest webhook event again",
            "description": "The latest event (the final one, else `running`) is made due now, with the same "
            "`webhook-id`; a delivery that was given up starts its retry schedule again.",
            "operationId": "redeliverWebhook",
            "parameters": [_TASK_ID],
            "responses": {
                "202": _json(_ref("Redelivery"), "The event is due now"),
                "401": _error(_UNAUTHORIZED),
                "404": _error("No such task"),
                "409": _error("`no_webhook`: the task has no webhook, or no event yet"),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/tasks/{task_id}/outputs/{index}": {
        "get": {
            "summary": "Redirect to a fresh presigned URL of one output",
            "operationId": "getOutput",
            "parameters": [
                _TASK_ID,
                {
                    "name": "index",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 0},
                },
            ],
            "responses": {
                "302": {
                    "description": "Redirect",
                    "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
                },
                "401": _error(_UNAUTHORIZED),
                "404": _error("No such task or output"),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/usage": {
        "get": {
            "summary": "The caller's tenant's counts per UTC day",
            "operationId": "getUsage",
            "parameters": [
                {
                    "name": "days",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": USAGE_MAX_DAYS, "default": 30},
                }
            ],
            "responses": {
                "200": _json(_ref("Usage"), "Counts per day"),
                "400": _error("days out of range"),
                "401": _error(_UNAUTHORIZED),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/webhooks/secret": {
        "get": {
            "summary": "The caller's tenant's webhook signing secret (made when first asked for)",
            "operationId": "getWebhookSecret",
            "responses": {
                "200": _json(_ref("WebhookSecret"), "The current secret"),
                "401": _error(_UNAUTHORIZED),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/webhooks/secret/rotate": {
        "post": {
            "summary": "A new webhook secret; the old one keeps signing for WEBHOOK_SECRET_GRACE_SECONDS",
            "operationId": "rotateWebhookSecret",
            "responses": {
                "200": _json(_ref("WebhookSecret"), "The new secret"),
                "401": _error(_UNAUTHORIZED),
                "503": _unavailable("The store is unavailable"),
            },
        }
    },
    "/v1/admin/tenants": {
        "get": {
            "summary": "Every tenant: settings, keys, tasks unfinished, waiting and admitted, usage today",
            "operationId": "adminListTenants",
            **_ADMIN,
            "responses": {"200": _json(_ref("TenantList"), "The tenants"), **_ADMIN_ERRORS},
        }
    },
    "/v1/admin/tenants/{tenant}": {
        "put": {
            "summary": "Create a tenant or change its settings",
            "operationId": "adminPutTenant",
            **_ADMIN,
            "parameters": [_TENANT],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("TenantSettings")}},
            },
            "responses": {
                "200": _json(_ref("Tenant"), "The tenant's settings now"),
                "400": _error("An unknown field, a value out of range, or an invalid tenant name"),
                **_ADMIN_ERRORS,
            },
        }
    },
    "/v1/admin/tenants/{tenant}/keys": {
        "post": {
            "summary": "A new API key for the tenant, shown once",
            "operationId": "adminCreateKey",
            **_ADMIN,
            "parameters": [_TENANT],
            "responses": {
                "201": _json(_ref("ApiKey"), "The key (store it: it cannot be shown again)"),
                "400": _error("An invalid tenant name"),
                **_ADMIN_ERRORS,
            },
        }
    },
    "/v1/admin/keys": {
        "get": {
            "summary": "The keys made through the admin API (without the keys themselves)",
            "operationId": "adminListKeys",
            **_ADMIN,
            "responses": {"200": _json(_ref("ApiKeyList"), "The keys"), **_ADMIN_ERRORS},
        }
    },
    "/v1/admin/keys/{key_id}": {
        "delete": {
            "summary": "Revoke a key: refused at once by every API process",
            "operationId": "adminRevokeKey",
            **_ADMIN,
            "parameters": [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "Revoked"}, **_ADMIN_ERRORS},
        }
    },
    "/healthz": {
        "get": {
            "summary": "The process is alive",
            "operationId": "healthz",
            **_OPEN,
            "responses": {"200": _json(_ref("Health"), "Alive")},
        }
    },
    "/readyz": {
        "get": {
            "summary": "Redis and storage are reachable",
            "operationId": "readyz",
            **_OPEN,
            "responses": {
                "200": _json(_ref("Readiness"), "Ready"),
                "503": _json(_ref("Readiness"), "A dependency is unreachable"),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Metrics in the Prometheus text format (README.md, Metrics)",
            "operationId": "metrics",
            **_OPEN,
            "responses": {
                "200": {
                    "description": "Every API process's metrics, and the queues read from Redis",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            **_OPEN,
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3 document")},
        }
    },
    "/docs": {
        "get": {
            "summary": "This document, rendered by Swagger UI (its files under /docs/static/, served here)",
            "operationId": "docs",
            **_OPEN,
            "responses": {"200": {"description": "An HTML page", "content": {"text/html": _STRING}}},
        }
    },
}

# Without API_KEYS the API is open: a bearer token may be sent and is ignored (it scopes Idempotency-Keys).
_AUTH_OPTIONAL: list[dict[str, list[str]]] = [{}, {"bearer": []}]
_AUTH_REQUIRED: list[dict[str, list[str]]] = [{"bearer": []}]


@cache
def openapi_document(*, auth_required: bool) -> dict[str, Any]:
    """The document for a server that requires API keys (``Config.auth_required``) or not.

    Cached and shared: callers must not change it."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "imagegen-queue",
            "version": "0.1.0",
            "description": "A reliable asynchronous job queue in front of Gemini image generation.",
        },
        "paths": _PATHS,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "a tenant's API key"},
                "admin": {"type": "http", "scheme": "bearer", "description": "ADMIN_API_KEY"},
            },
        },
        "security": _AUTH_REQUIRED if auth_required else _AUTH_OPTIONAL,
    }
