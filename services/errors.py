"""The one error tree of imagegen-queue.

Every error the project raises on purpose is a ``ServiceError``. Each knows the HTTP status it maps to,
its machine-readable ``code``, and whether retrying the same work may succeed. Lower-level errors
(redis, botocore, httpx) are mapped to these at the boundary of the module that talks to them
(``raise StoreUnavailable(...) from exc``) and never leak further.

    ServiceError                      500 internal_error
    ├── RequestError                  4xx: the client's request is wrong; nothing is stored
    │   ├── InvalidRequest            400 (invalid_json, invalid_body, missing_field, invalid_field,
    │   │                                  invalid_base64, unsupported_mime_type, unsupported_model,
    │   │                                  too_many_images, inline_image_too_large, metadata_too_large)
    │   ├── Unauthorized              401 unauthorized
    │   ├── NotFound                  404 not_found
    │   ├── IdempotencyConflict       409 idempotency_in_progress (the same key is being handled)
    │   ├── IdempotencyKeyReused      422 idempotency_key_reused  (the same key with another body)
    │   ├── UnsupportedMediaType      415 unsupported_media_type
    │   └── PayloadTooLarge           413 payload_too_large
    ├── StoreUnavailable              503 store_unavailable      (retryable: Redis is down)
    ├── StorageUnavailable            503 storage_unavailable    (retryable: S3 is down)
    ├── InvalidTransition             409 invalid_transition     (a state change the task's state forbids)
    ├── LeaseLost                     409 lease_lost             (a worker's lease on its task expired)
    └── JobError                      why one generation job failed; recorded on the task as ``error``
        ├── UpstreamError             the upstream said no, or could not be reached
        │     codes: upstream_rejected (400), upstream_auth (401/403), upstream_not_found (404),
        │            upstream_rate_limited (429), upstream_quota_exhausted (429 per day),
        │            upstream_unavailable (5xx, timeouts, connection errors)
        └── ResponseError             HTTP 200 but no usable image
              codes: content_blocked, no_image, bad_upstream_response
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the project raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        retryable: bool | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        if status is not None:
            self.status = status
        self.field = field

    def to_body(self) -> dict[str, Any]:
        """The JSON body our API answers with: ``{"error": {"code", "message", "field"}}``."""
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, field={self.field!r})"


class RequestError(ServiceError):
    status = 400
    code = "invalid_request"


class InvalidRequest(RequestError):
    status = 400
    code = "invalid_field"


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class IdempotencyConflict(RequestError):
    status = 409
    code = "idempotency_in_progress"


class IdempotencyKeyReused(RequestError):
    status = 422
    code = "idempotency_key_reused"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class StoreUnavailable(ServiceError):
    status = 503
    code = "store_unavailable"
    retryable = True


class StorageUnavailable(ServiceError):
    status = 503
    code = "storage_unavailable"
    retryable = True


class InvalidTransition(ServiceError):
    status = 409
    code = "invalid_transition"


class LeaseLost(ServiceError):
    """The caller's lease on a task expired; another worker may run the task now."""

    status = 409
    code = "lease_lost"


class JobError(ServiceError):
    """Why one job (or one attempt of it) failed. ``retry_after`` is a hint in seconds, if any."""

    code = "job_failed"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        upstream_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable)
        self.upstream_status = upstream_status
        self.retry_after = retry_after

    def to_record(self) -> dict[str, Any]:
        """The ``error`` object stored on a failed task."""
        return {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "upstream_status": self.upstream_status,
        }


class UpstreamError(JobError):
    code = "upstream_unavailable"
    retryable = True


class ResponseError(JobError):
    code = "bad_upstream_response"
    retryable = False
