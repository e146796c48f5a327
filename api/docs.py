"""``/docs``: the OpenAPI document (``/openapi.json``) rendered by Swagger UI, served by the API itself.

The page is ours; Swagger UI's scripts and styles are the files the ``flask-swagger-ui`` package ships
(its ``dist/``), served under ``/docs/static/``: nothing comes from a CDN, and the page's
Content-Security-Policy lets the browser load nothing from anywhere else (no online validator badge, no
fonts or images from elsewhere). Its links are relative, so it works behind a proxy's path prefix too.
Like ``/openapi.json`` it needs no key; "Authorize" takes one for "Try it out".
"""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files
from pathlib import Path

from flask import Blueprint, Response

STATIC_DIR = Path(str(files("flask_swagger_ui") / "dist"))

blueprint = Blueprint("docs", __name__, static_folder=STATIC_DIR, static_url_path="/docs/static")

_SCRIPT = """
window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null,
    persistAuthorization: false
  });
};
"""

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>imagegen-queue API</title>
  <link rel="stylesheet" href="docs/static/swagger-ui.css">
  <link rel="stylesheet" href="docs/static/index.css">
  <link rel="icon" type="image/png" href="docs/static/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/static/swagger-ui-bundle.js"></script>
  <script>{_SCRIPT}</script>
</body>
</html>
"""

# Only this page's own script and the files under /docs/static run; requests go to this origin only.
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src 'self' 'sha256-{_SCRIPT_HASH}'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@blueprint.get("/docs")
def docs() -> Response:
    response = Response(PAGE, mimetype="text/html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response
