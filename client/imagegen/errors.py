"""Every error the SDK raises.

httpx's and standardwebhooks' own errors are mapped to these where the SDK calls them
(``raise APIConnectionError(...) from exc``); none leaks out bare.

    ImagegenError                     base of everything below
    ├── InvalidImageError             an input image of a type the server does not take (also ValueError)
    ├── APIConnectionError            the server could not be reached (after the retries that were safe)
    ├── APIError                      the server answered an error: .status, .code (its error.code),
    │   │                             .message, .field (a JSON path or a header name), .retry_after
    │   ├── BadRequestError           400 invalid_body, missing_field, invalid_field, unsupported_model, …
    │   ├── AuthenticationError       401 unauthorized
    │   ├── PermissionDeniedError     403 forbidden
    │   ├── NotFoundError             404 not_found (also another tenant's task)
    │   ├── ConflictError             409 invalid_transition, idempotency_in_progress, no_webhook
    │   ├── UnprocessableError        422 idempotency_key_reused
    │   ├── RateLimitError            429 rate_limited, tenant_queue_full (after the retries)
    │   └── ServerError               5xx store_unavailable, storage_unavailable, internal_error
    ├── TaskFailedError               a task ended failed or canceled: .task, .code (the task's error.code,
    │                                 or "canceled")
    ├── WaitTimeoutError              a task was not final in time: .task (as last seen)
    ├── DownloadError                 an output could not be fetched, or its bytes do not match its sha256
    └── WebhookVerificationError      a webhook's signature or timestamp is wrong
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagegen.models import Task


class ImagegenError(Exception):
    """Base of every error the SDK raises."""


class InvalidImageError(ImagegenError, ValueError):
    """An input image that is not PNG, JPEG, WebP, HEIC or HEIF."""


class APIConnectionError(ImagegenError):
    """The server could not be reached, or the connection broke before it answered."""


class APIError(ImagegenError):
    """The server answered ``status`` with ``{"error": {"code", "message", "field"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after


class BadRequestError(APIError):
    """400: the request is wrong; ``field`` says where."""


class AuthenticationError(APIError):
    """401: no key, or a key the server does not know."""


class PermissionDeniedError(APIError):
    """403: the key may not do this."""


class NotFoundError(APIError):
    """404: no such task (for this key's tenant), output or endpoint."""


class ConflictError(APIError):
    """409: the task's state forbids it (e.g. canceling a final task)."""


class UnprocessableError(APIError):
    """422: e.g. an Idempotency-Key reused with another body."""


class RateLimitError(APIError):
    """429: still refused after the retries; ``retry_after`` says when to come back."""


class ServerError(APIError):
    """5xx: the server could not do it now."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableError,
    429: RateLimitError,
}


def api_error(
    status: int, code: str, message: str, *, field: str | None = None, retry_after: float | None = None
) -> APIError:
    """The APIError subclass of ``status``."""
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return kind(status, code, message, field=field, retry_after=retry_after)


class TaskFailedError(ImagegenError):
    """The task ended ``failed`` (``code`` = its ``error.code``) or ``canceled`` (``code`` = "canceled")."""

    def __init__(self, task: Task) -> None:
        self.task = task
        if task.error is not None:
            self.code = task.error.code
            detail = f"{task.error.code}: {task.error.message}"
        else:
            self.code = task.status
            detail = task.status
        super().__init__(f"task {task.id} {task.status}: {detail}")


class WaitTimeoutError(ImagegenError, TimeoutError):
    """The task was not final before the timeout; ``task`` is how it was last seen."""

    def __init__(self, task: Task, timeout: float) -> None:
        super().__init__(f"task {task.id} still {task.status} after {timeout:g}s")
        self.task = task


class DownloadError(ImagegenError):
    """An output could not be fetched, or what was fetched is not what the task recorded."""


class WebhookVerificationError(ImagegenError):
    """The webhook's signature does not match, its timestamp is too far off, or a header is missing."""
