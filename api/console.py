"""The web console: the static page in ``api/console_static/`` (HTML, JS, CSS; no build step, no CDN).

``/console`` redirects to ``/console/`` (Flask's trailing-slash rule), whose relative links find the
assets and the API wherever the service is mounted. The page holds no data and needs no key (``auth.py``
guards ``/v1/`` only); in the browser it calls the API with the tenant's key, which it keeps in
sessionStorage. Its Content-Security-Policy allows scripts, styles and API calls from this origin only,
images also from the storage's presigned URLs, and no form submissions, so a key typed into the page
can go nowhere but the API.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

CONSOLE_DIR = Path(__file__).resolve().parent / "console_static"

blueprint = Blueprint("console", __name__)

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' http: https: data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # revalidated on every load (ETag), so a new version shows at once
    "Cache-Control": "no-cache",
}


@blueprint.get("/console/")
def index() -> Response:
    return _send("index.html")


@blueprint.get("/console/<path:filename>")
def asset(filename: str) -> Response:
    return _send(filename)


def _send(filename: str) -> Response:
    """A file of the console (404 for anything else, ``..`` included: ``send_from_directory``)."""
    response = send_from_directory(CONSOLE_DIR, filename)
    response.headers.update(_HEADERS)
    return response
