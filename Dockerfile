# syntax=docker/dockerfile:1
# One image for the API (gunicorn) and the workers (celery); docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --user-group app

# Install the project (runtime dependencies only, no test extras) from the build context mounted
# read-write for the build, so neither the sources nor pip's cache end up in a layer.
RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install /src

# A numeric UID so that orchestrators can verify runAsNonRoot.
USER 10001:10001
WORKDIR /home/app
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "8", "api:create_app()"]
