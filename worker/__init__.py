"""Celery workers: translate a Celery message into a call on ``services.jobs``. Imports only services."""
