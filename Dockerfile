# syntax=docker/dockerfile:1
# The API (gunicorn) and the workers (celery) run the `app` stage, the last one, which a plain `docker build .`
# builds; docker-compose.yml picks the command. The upstream simulator (compose profile `sim`) runs the
# `simulator` stage: the same image plus Pillow; Flower (profile `flower`) the `flower` stage, plus Flower.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --user-group app

# jemalloc, which the workers preload (LD_PRELOAD in docker-compose.yml and deploy/kubernetes/): under glibc's
# malloc a worker's RSS grows with the jobs it has run, under jemalloc it stays flat (README.md, Memory).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*

# The runtime dependencies at the versions CI tested (requirements/runtime.txt, no test or dev extras),
# then the project without resolving again, from the build context mounted read-write for the build, so
# neither the sources nor pip's cache end up in a layer.
RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install -r /src/requirements/runtime.txt \
    && pip install --no-deps /src

# A numeric UID so that orchestrators can verify runAsNonRoot.
USER 10001:10001
WORKDIR /home/app

FROM base AS simulator
USER root
# simulator/images.py renders with Pillow (its only import outside the standard library), at the version
# the tests ran with: requirements/dev.txt as constraints, so nothing else of the dev lock is installed.
RUN --mount=type=bind,target=/src \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --constraint /src/requirements/dev.txt pillow
USER 10001:10001
EXPOSE 8100
CMD ["python", "-m", "simulator", "--host", "0.0.0.0", "--port", "8100"]

FROM base AS flower
USER root
# Flower, Celery's dashboard (compose profile `flower`), at the version the tests ran with: requirements/dev.txt
# as constraints, so nothing else of the dev lock is installed. It reads the broker and asks the workers.
RUN --mount=type=bind,target=/src \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --constraint /src/requirements/dev.txt flower
USER 10001:10001
EXPOSE 5555
CMD ["celery", "-A", "worker.main", "flower", "--address=0.0.0.0", "--port=5555"]

FROM base AS app
# An API without keys refuses to start here (api/app.py): set API_KEYS or ADMIN_API_KEY, or ALLOW_OPEN_API=true
# to run one open on purpose. (`make run`, outside the image, stays open for local use.)
ENV ALLOW_OPEN_API=false
EXPOSE 8000
COPY gunicorn.conf.py ./
# -c gunicorn.conf.py: GET /metrics adds up the processes; gunicorn's own lines in LOG_FORMAT.
# gevent workers: a request that waits (Prefer: wait, GET /v1/tasks/{id}/events) holds a greenlet, not a thread,
# so one process holds thousands of them (bench/README.md, scenario waiters); --worker-connections caps them.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "--bind", "0.0.0.0:8000", "--workers", "4", "--worker-class", "gevent", "--worker-connections", "2000", "api:create_app()"]
