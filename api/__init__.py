"""The HTTP API: translate HTTP into calls on ``services`` and back. Imports only services.

``create_app()`` is the WSGI factory: ``gunicorn 'api:create_app()'``.
"""

from api.app import create_app

__all__ = ["create_app"]
