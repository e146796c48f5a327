"""The API's side of the logs (``services/logs.py`` holds the formats, the scope and the redaction).

Each request runs in a log scope of its own, opened when the WSGI server calls the app and closed when it
closes the answer, after gunicorn wrote its access line: so that line, like every line logged while the
request is handled, carries the task's id and the caller's tenant when the path names a task
(``/v1/tasks/{task_id}/…``; a submission binds the id of the task it made).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import Flask, g
from werkzeug.wsgi import ClosingIterator

from services import logs
from services.config import Config

WsgiApp = Any  # (environ, start_response) -> iterable of bytes


def configure(config: Config) -> None:
    """With ``LOG_FORMAT=json``, every line of the process as JSON; text leaves the process's logging as
    the server (gunicorn, a test) set it up, as it always did."""
    if config.log_format == "json":
        logs.configure(config)


def register(app: Flask) -> None:
    """Open a scope per request and bind the task and tenant of each: call it after the blueprints are
    registered, so that the binding runs after authentication."""
    app.wsgi_app = _scoped(app.wsgi_app)  # type: ignore[method-assign]
    app.url_value_preprocessor(_bind_task)
    app.before_request(_bind_tenant)


def _scoped(wsgi_app: WsgiApp) -> WsgiApp:
    def scoped(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        token = logs.open_scope()
        try:
            answer = wsgi_app(environ, start_response)
        except BaseException:
            logs.close_scope(token)
            raise
        return ClosingIterator(answer, lambda: logs.close_scope(token))

    return scoped


def _bind_task(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Before anything else runs (authentication too): the task a path names."""
    task_id = (values or {}).get("task_id")
    logs.bind(task_id=task_id if isinstance(task_id, str) else None)


def _bind_tenant() -> None:
    """After authentication (registered after it): the caller's tenant."""
    logs.bind(tenant=g.get("tenant"))
