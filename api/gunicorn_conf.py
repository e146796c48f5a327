"""gunicorn's settings for the API: ``gunicorn -c python:api.gunicorn_conf 'api:create_app()'``.

With ``LOG_FORMAT=json``, gunicorn's own lines (its master's "Listening at", a worker's boot, the access
log when ``--access-logfile`` is given) come out as JSON like the app's, through gunicorn's usual handlers
and destinations; only their formatter changes. With text, gunicorn logs as it always does. The app's own
lines are configured by ``create_app`` (``api/app.py``).
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from services import logs
from services.config import load_config


class ConfiguredLogger(Logger):  # type: ignore[misc]  # gunicorn is untyped: its base classes are Any
    """gunicorn's logger, its handlers given the configured formatter (and the log scope's fields)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        config = load_config()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                logs.reformat(handler, config)


if load_config().log_format == "json":
    logger_class = ConfiguredLogger
