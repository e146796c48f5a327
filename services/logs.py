"""Log lines: plain text (the default) or one JSON object per line (``LOG_FORMAT=json``), each line about
a task carrying its ``task_id`` and ``tenant``, and no secret in any line.

- A *scope* (a contextvar) holds the fields of what the current thread is handling: the API opens one per
  request (``api/app.py``) and its task endpoints bind the task; a worker opens one per Celery task
  (``worker/logs.py``), and ``JobRunner.run`` and ``WebhookService.deliver`` bind the task and its tenant
  as soon as they know them. ``task_scope`` joins the scope already open, so that lines logged after the
  service returned (Celery's "succeeded in 1.52s", gunicorn's access line) carry the fields too.
- ``ScopeFilter`` copies the scope's fields onto every record; ``JsonFormatter`` writes them with the
  time, level, logger, message and exception.
- Both formatters redact, as a safety net under code that already logs no secret: the configured secrets
  themselves (API keys, the admin key, the upstream key, S3's secret key, the webhook signing secret),
  bearer and basic credentials, ``whsec_`` secrets, keys made through the admin API (``iqk_…``), passwords
  in URLs, and the values of query parameters that sign or authorise (``X-Amz-Signature``,
  ``X-Amz-Credential``, ``token``, ``key``, ``sig``…).
- ``configure`` installs one handler on the root logger (stderr); called again, it replaces it.

Imports only ``config`` and ``clock`` of the project; nothing here imports Flask, Celery or gunicorn.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TextIO

from services import clock
from services.config import Config

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SCOPE_FIELDS = ("task_id", "batch_id", "tenant")
REDACTED = "[REDACTED]"
# A configured secret shorter than this is not searched for in every line: it would redact ordinary
# words (a test's "test" key). Such a secret is too short to be a secret anyway.
MIN_SECRET_LENGTH = 8

_scope: ContextVar[dict[str, str] | None] = ContextVar("imagegen_log_scope", default=None)


# scope --------------------------------------------------------------------------------------------
def open_scope(**fields: str | None) -> Token[dict[str, str] | None]:
    """Start a scope of ``fields`` in the current context; ``close_scope`` ends it."""
    return _scope.set({name: value for name, value in fields.items() if value})


def close_scope(token: Token[dict[str, str] | None]) -> None:
    _scope.reset(token)


def bind(**fields: str | None) -> None:
    """Add ``fields`` to the current scope (none open: nothing happens)."""
    current = _scope.get()
    if current is not None:
        current.update({name: value for name, value in fields.items() if value})


@contextmanager
def task_scope(task_id: str, tenant: str | None = None) -> Iterator[None]:
    """Lines logged in the block carry ``task_id`` (and ``tenant``). A scope already open that names no
    task or this one is joined, so that what is bound in the block stays bound after it."""
    current = _scope.get()
    if current is not None and current.get("task_id") in (None, task_id):
        bind(task_id=task_id, tenant=tenant)
        yield
        return
    token = open_scope(task_id=task_id, tenant=tenant)
    try:
        yield
    finally:
        close_scope(token)


def scope_fields() -> dict[str, str]:
    return dict(_scope.get() or {})


class ScopeFilter(logging.Filter):
    """Puts the scope's fields on each record (a field the record already has is kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # a copy (made in one step): the lease keeper's thread logs from a copy of a job's context,
        # whose scope the job's thread may be binding to meanwhile
        for name, value in dict(_scope.get() or {}).items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


# redaction ----------------------------------------------------------------------------------------
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer <token> / Basic <credentials>, in a header dump or a message
    (re.compile(r"\b(Bearer|Basic)(\s+)[^\s\"',;]+", re.IGNORECASE), rf"\1\2{REDACTED}"),
    (
        re.compile(r"(authorization[\"']?\s*[:=]\s*[\"']?)(?!Bearer\b|Basic\b)[^\s\"',;]+", re.I),
        rf"\1{REDACTED}",
    ),
    # Standard Webhooks secrets and keys made through the admin API
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), f"whsec_{REDACTED}"),
    (re.compile(r"\biqk_[A-Za-z0-9_-]{8,}"), f"iqk_{REDACTED}"),
    # a password in a URL: scheme://user:password@host (not Celery's mask, ``redis://:**@host``)
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@\"']*:)(?!\*+@)[^\s@/\"']+@", re.I), rf"\1{REDACTED}@"),
    # query parameters that sign or authorise: X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token,
    # Signature, token, access_token, key, api_key, sig, secret, password
    (
        re.compile(
            r"([?&](?:x-amz-(?:signature|credential|security-token)|signature|[a-z_]*token|[a-z_]*key"
            r"|sig|secret|password)=)[^&\s\"'#]+",
            re.IGNORECASE,
        ),
        rf"\1{REDACTED}",
    ),
)


class Redactor:
    """Replaces what looks like a secret, and each of ``secrets``, by ``[REDACTED]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        literal = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self._literal = re.compile("|".join(re.escape(s) for s in literal)) if literal else None

    def __call__(self, text: str) -> str:
        if self._literal is not None:
            text = self._literal.sub(REDACTED, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


def secrets_of(config: Config) -> list[str]:
    """Every secret the configuration holds."""
    values: list[str | None] = [key for _, key in config.api_keys]
    values += [config.admin_api_key, config.upstream_api_key, config.aws_secret_access_key]
    values.append(config.webhook_signing_secret)
    return [value for value in values if value]


# formatters ---------------------------------------------------------------------------------------
class TextFormatter(logging.Formatter):
    """``2026-12-02 05:30:01,123 INFO services.jobs: task …: succeeded``: the plain format, redacted."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__(TEXT_FORMAT)
        self._redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``message``, ``task_id`` and ``tenant``
    when the line is about a task, ``process``, ``thread``, and ``exception`` with its traceback."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self._redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": clock.iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": self._redact(record.getMessage()),
        }
        for name in SCOPE_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = self._redact(str(value))
        line["process"] = record.process
        line["thread"] = record.threadName
        if record.exc_info:
            line["exception"] = self._redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = self._redact(record.exc_text)
        if record.stack_info:
            line["stack"] = self._redact(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(config: Config) -> logging.Formatter:
    """The formatter ``LOG_FORMAT`` asks for, redacting ``config``'s secrets."""
    redact = Redactor(secrets_of(config))
    return JsonFormatter(redact) if config.log_format == "json" else TextFormatter(redact)


class Handler(logging.StreamHandler[TextIO]):
    """Ours: ``configure`` replaces it and leaves other handlers be."""


def make_handler(config: Config, stream: TextIO | None = None) -> Handler:
    """A stream handler (default: stderr) with the configured formatter and the scope filter."""
    handler = Handler(stream or sys.stderr)
    handler.setFormatter(formatter(config))
    handler.addFilter(ScopeFilter())
    return handler


def reformat(handler: logging.Handler, config: Config) -> None:
    """Give a handler another library made (gunicorn's) the configured formatter and the scope filter."""
    handler.setFormatter(formatter(config))
    if not any(isinstance(f, ScopeFilter) for f in handler.filters):
        handler.addFilter(ScopeFilter())


def configure(config: Config, level: int = logging.INFO) -> logging.Handler:
    """Log INFO and above from every logger to stderr in the configured format; replaces the handler
    an earlier call installed, and leaves any other handler (a test runner's) where it is."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, Handler):
            root.removeHandler(handler)
    handler = make_handler(config)
    root.addHandler(handler)
    root.setLevel(level)
    if config.log_format == "json":
        logging.captureWarnings(True)  # warnings.warn() writes to stderr otherwise, as plain text
    return handler
