"""The Python SDK of imagegen-queue.

    from imagegen import Client

    client = Client()  # IMAGEGEN_URL, IMAGEGEN_API_KEY
    task = client.wait(client.generate("a red fox", aspect_ratio="16:9", image_size="2K"))
    paths = client.download(task, "out/")

``AsyncClient`` has the same methods, to await. Errors: ``imagegen.errors`` (drawn in its docstring).
"""

from imagegen._async import AsyncClient
from imagegen._client import Client
from imagegen._retry import PollPolicy, RetryPolicy
from imagegen._version import __version__
from imagegen.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DownloadError,
    ImagegenError,
    InvalidImageError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TaskFailedError,
    UnprocessableError,
    WaitTimeoutError,
    WebhookVerificationError,
)
from imagegen.models import Attempt, Output, Page, Task, TaskError, TaskStatus
from imagegen.webhooks import WebhookEvent, verify_webhook

__all__ = [
    "APIConnectionError",
    "APIError",
    "AsyncClient",
    "Attempt",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "DownloadError",
    "ImagegenError",
    "InvalidImageError",
    "NotFoundError",
    "Output",
    "Page",
    "PermissionDeniedError",
    "PollPolicy",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "Task",
    "TaskError",
    "TaskFailedError",
    "TaskStatus",
    "UnprocessableError",
    "WaitTimeoutError",
    "WebhookEvent",
    "WebhookVerificationError",
    "__version__",
    "verify_webhook",
]
