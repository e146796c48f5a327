"""The Flask app factory: configuration, clients, error handlers and routes."""

from __future__ import annotations

import logging

from flask import Flask, Response

from api import admin, auth, console, docs, errors, logs, routes
from services.config import Config, load_config
from services.errors import ConfigError
from services.runtime import Runtime

log = logging.getLogger(__name__)


def create_app(config: Config | None = None) -> Flask:
    config = config or load_config()
    logs.configure(config)
    if not config.auth_required and not config.allow_open_api:
        raise ConfigError(
            "the API would be open to anyone who can reach it: set API_KEYS or ADMIN_API_KEY, or "
            "ALLOW_OPEN_API=true to run it without keys on purpose"
        )
    app = Flask(__name__)
    app.config.from_mapping(MAX_CONTENT_LENGTH=config.max_body_bytes, JSON_SORT_KEYS=False)
    app.extensions["runtime"] = Runtime(config)
    if not config.auth_required:
        log.warning("API_KEYS and ADMIN_API_KEY are unset: the API is open to anyone who can reach it")
    errors.register(app)
    app.register_blueprint(auth.blueprint)
    app.register_blueprint(routes.blueprint)
    app.register_blueprint(admin.blueprint)
    app.register_blueprint(console.blueprint)
    app.register_blueprint(docs.blueprint)
    logs.register(app)
    app.after_request(_no_content_no_type)
    return app


def _no_content_no_type(response: Response) -> Response:
    """A 204 has no content, so no Content-Type either: Flask's ``Response(status=204)`` would say
    ``text/html`` (``DELETE /v1/tasks/{id}``, ``DELETE /v1/admin/keys/{id}``)."""
    if response.status_code == 204:
        response.headers.pop("Content-Type", None)
    return response
