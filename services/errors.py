"""The one error tree of imagegen-queue.

Every error the project raises on purpose is a ``ServiceError``. Each knows the HTTP status it maps to,
its machine-readable ``code``, and whether retrying the same work may succeed. Lower-level errors
(redis, botocore, httpx) are mapped to these at the boundary of the module that talks to them
(``raise StoreUnavailable(...) from exc``) and never leak further.

    ServiceError                      500 internal_error
    ├── ConfigError                   500 invalid_config         (a variable has a value we cannot use)
    ├── RequestError                  4xx: the client's request is wrong; nothing is stored
    │   ├── InvalidRequest            400 (invalid_json, invalid_body, missing_field, invalid_field,
    │   │   │                              invalid_base64, unsupported_mime_type, unsupported_model,
    │   │   │                              too_many_images, inline_image_too_large, metadata_too_large,
    │   │   │                              invalid_idempotency_key)
    │   │   └── AddressNotAllowed     400 address_not_allowed    (a webhook host we never connect to)
    │   ├── Unauthorized              401 unauthorized
    │   ├── Forbidden                 403 forbidden              (an admin endpoint without the admin key)
    │   ├── NotFound                  404 not_found              (also another tenant's task)
    │   ├── TooManyRequests           429 tenant_queue_full, rate_limited (a tenant's limits; Retry-After)
    │   ├── NoWebhook                 409 no_webhook             (nothing to redeliver)
    │   ├── IdempotencyConflict       409 idempotency_in_progress (the same key is being handled)
    │   ├── IdempotencyKeyReused      422 idempotency_key_reused  (the same key with another body)
    │   ├── UnsupportedMediaType      415 unsupported_media_type
    │   └── PayloadTooLarge           413 payload_too_large
    ├── StoreUnavailable              503 store_unavailable      (retryable: Redis is down)
    ├── StorageUnavailable            503 storage_unavailable    (retryable: S3 is down)
    ├── BrokerUnavailable             503 broker_unavailable     (retryable: RabbitMQ is down; never
    │                                                             shown: the outbox keeps the message)
    ├── InvalidTransition             409 invalid_transition     (a state change the task's state forbids)
    ├── LeaseLost                     409 lease_lost             (a worker's lease on its task expired)
    ├── CallCutOff                    409 call_cut_off           (a canceled task's upstream call, cut off:
    │                                                             never shown)
    ├── Deferred                      503 deferred               (the upstream limiter asks to wait: the
    │                                                             task is given back, never shown)
    └── JobError                      why one generation job failed; recorded on the task as ``error``
        │     codes of its own: worker_lost (its worker died, MAX_ATTEMPTS times), attempts_exhausted,
        │            storage_unavailable, internal_error
        ├── UpstreamError             the upstream said no, or could not be reached
        │     codes: upstream_rejected (400), upstream_auth (401/403), upstream_not_found (404),
        │            upstream_rate_limited (429), upstream_quota_exhausted (429 per day),
        │            upstream_unavailable (5xx, connection errors), upstream_timeout,
        │            upstream_response_too_large; of an image URL in the answer: output_url_refused,
        │            output_too_large, output_download_failed
        └── ResponseError             HTTP 200 but no usable image
              codes: content_blocked, no_image, bad_upstream_response

The HTTP-level refusals Flask makes itself (405 method_not_allowed, 400 bad_request) are shaped the same
way by ``api/errors.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.records import ErrorRecord


class ServiceError(Exception):
    """Base of every error the project raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    retryable: bool = False
    retry_after: float | None = None  # seconds: the API sends it as Retry-After

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


class ConfigError(ServiceError):
    """A variable is missing or has a value we cannot use; the message names it."""

    code = "invalid_config"


class RequestError(ServiceError):
    status = 400
    code = "invalid_request"


class InvalidRequest(RequestError):
    status = 400
    code = "invalid_field"


class AddressNotAllowed(InvalidRequest):
    """A host is, or resolves to, an address we do not connect to; ``reason`` says why in words that
    name no address (``loopback``, ``private``, ``metadata service``, ...), for what clients see."""

    code = "address_not_allowed"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"


class Forbidden(RequestError):
    status = 403
    code = "forbidden"


class TooManyRequests(RequestError):
    """A tenant's limit refused a submission (``tenant_queue_full``, ``rate_limited``); retry after."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, code: str, retry_after: float) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class NotFound(RequestError):
    status = 404
    code = "not_found"


class NoWebhook(RequestError):
    """A redeliver asked of a task that has no webhook, or no event yet."""

    status = 409
    code = "no_webhook"


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


class BrokerUnavailable(ServiceError):
    status = 503
    code = "broker_unavailable"
    retryable = True


class StorageUnavailable(ServiceError):
    status = 503
    code = "storage_unavailable"
    retryable = True


class InvalidTransition(ServiceError):
    """A change the task's status forbids; ``current`` is that status, when the store knows it."""

    status = 409
    code = "invalid_transition"

    def __init__(self, message: str, *, current: str | None = None) -> None:
        super().__init__(message)
        self.current = current


class LeaseLost(ServiceError):
    """The caller's lease on a task expired; another worker may run the task now."""

    status = 409
    code = "lease_lost"


class CallCutOff(ServiceError):
    """An upstream call that a cancel cut off (``services/cancellation.py``): its task is canceled already,
    so there is nothing to record."""

    status = 409
    code = "call_cut_off"


class Deferred(ServiceError):
    """The upstream limiter asks for a long wait: give the task back and retry it after ``delay`` s."""

    status = 503
    code = "deferred"
    retryable = True

    def __init__(self, delay: float) -> None:
        super().__init__(f"the upstream limiter asks to wait {delay:.1f}s")
        self.delay = delay


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

    def to_record(self) -> ErrorRecord:
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
