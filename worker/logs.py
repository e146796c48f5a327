"""Celery's side of the logs (``services/logs.py`` holds the formats, the scope and the redaction).

- Every Celery task runs in a log scope of its own (``task_prerun`` to ``task_postrun``), which the
  services fill with the task's id and tenant, so Celery's own lines about it ("Task … succeeded in
  1.52s") carry them too; the line a message is received with gets the task's id from the message.
- With ``LOG_FORMAT=json`` every line is JSON, Celery's included: a ``setup_logging`` receiver keeps
  Celery from installing its own handlers and formats (our root handler takes its loggers' lines), the
  banner it prints at start is replaced by one log line, stray prints to stdout and stderr are logged as
  Celery does by default (``worker_redirect_stdouts``), and the notices its signal handlers write straight
  to the terminal ("worker: Warm shutdown (MainProcess)") are written as JSON lines, still with a bare
  ``os.write`` as Celery does in a signal handler. Text keeps Celery's defaults exactly.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
from contextvars import Token
from typing import IO, Any

import celery.apps.worker
from celery.signals import celeryd_after_setup, celeryd_init, setup_logging, task_postrun, task_prerun

from services import logs
from services.config import Config
from services.queue import DELIVER_WEBHOOK_TASK, GENERATE_TASK
from services.webhooks.outbox import event_task_id

log = logging.getLogger(__name__)

_scopes: dict[str, Token[dict[str, str] | None]] = {}


def install(config: Config) -> None:
    """Configure the process's logging for ``config`` and connect Celery's signals (once a process)."""
    handler = logs.configure(config)
    task_prerun.connect(_open_scope, weak=False, dispatch_uid="imagegen-log-scope-open")
    task_postrun.connect(_close_scope, weak=False, dispatch_uid="imagegen-log-scope-close")
    logging.getLogger("celery.worker.strategy").addFilter(_received_filter)
    if config.log_format != "json":
        return
    setup_logging.connect(_keep_our_logging, weak=False, dispatch_uid="imagegen-setup-logging")
    celeryd_init.connect(_no_banner, weak=False, dispatch_uid="imagegen-no-banner")
    celeryd_after_setup.connect(_after_setup, weak=False, dispatch_uid="imagegen-after-setup")
    celery.apps.worker.safe_say = _json_say(handler)


def _open_scope(task_id: str, **_: Any) -> None:
    _scopes[task_id] = logs.open_scope()


def _close_scope(task_id: str, **_: Any) -> None:
    token = _scopes.pop(task_id, None)
    if token is not None:
        logs.close_scope(token)


def task_of_message(name: str, argsrepr: str) -> str | None:
    """Our task's id from a Celery message's task name and ``argsrepr``, or None."""
    try:
        args = ast.literal_eval(argsrepr)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(args, (list, tuple)) or not args or not isinstance(args[0], str):
        return None
    if name == GENERATE_TASK:
        return args[0]
    if name == DELIVER_WEBHOOK_TASK:
        return event_task_id(args[0])
    return None


class _ReceivedFilter(logging.Filter):
    """Celery logs "Task …[message id] received" with the message's name and args as ``data``."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, dict) and getattr(record, "task_id", None) is None:
            task_id = task_of_message(str(data.get("name")), str(data.get("args")))
            if task_id is not None:
                record.task_id = task_id
        return True


_received_filter = _ReceivedFilter()


def _keep_our_logging(**_: Any) -> None:
    """A receiver of ``setup_logging``: its presence tells Celery to leave logging as it is."""


def _no_banner(instance: Any, **_: Any) -> None:
    instance.quiet = True  # the banner goes to the raw stdout; _after_setup logs it as one line


def _after_setup(sender: str, instance: Any, **_: Any) -> None:
    queues = ",".join(sorted(instance.app.amqp.queues.consume_from))
    log.info(
        "%s starting: celery %s, broker %s, pool %s, concurrency %s, queues %s, task events %s",
        sender,
        celery.__version__,
        instance.app.connection().as_uri(),
        str(instance.app.conf.worker_pool),
        instance.concurrency,
        queues,
        "on" if instance.task_events else "off",
    )
    if instance.redirect_stdouts:
        instance.app.log.redirect_stdouts(instance.redirect_stdouts_level)


def _json_say(handler: logging.Handler) -> Any:
    """Celery's ``safe_say`` (what its signal handlers print), as a JSON line."""

    def say(msg: str, f: IO[str] | None = None) -> None:
        stream = f or sys.__stderr__
        record = logging.LogRecord("celery.apps.worker", logging.WARNING, __file__, 0, msg, None, None)
        try:
            os.write(stream.fileno(), (handler.format(record) + "\n").encode())  # type: ignore[union-attr]
        except (OSError, AttributeError, ValueError):
            pass  # best effort, as Celery's own

    return say
