"""Every error leaves the API as JSON: ``{"error": {"code", "message", "field"}}``."""

from __future__ import annotations

import logging
import math

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from services.errors import ServiceError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(error: ServiceError) -> Response:
    response = jsonify(error.to_body())
    response.status_code = error.status
    if error.status in (429, 503):
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after or 1)))
    return response


def register(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(error: ServiceError) -> Response:
        if error.status >= 500:
            log.warning("%s: %s", error.code, error.message)
        return error_response(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            message = f"the request body is larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes"
        body = ServiceError(message, code=_HTTP_CODES.get(status, "http_error"), status=status)
        return error_response(body)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(ServiceError("internal server error"))
