"""``python -m devstack`` (what ``make run`` runs): the API, a generation worker and a webhook worker,
plus whatever is not configured.

REDIS_URL and REDIS_SENTINELS unset → a redis-server with AOF persistence in ``$DATA_DIR/redis`` (its URL in
``$DATA_DIR/redis_url``, for ``make flower``); S3_ENDPOINT_URL unset → an
embedded S3 server (moto) whose data is NOT kept; UPSTREAM_BASE_URL unset → the upstream simulator;
WEBHOOK_SIGNING_SECRET unset → a secret generated once and kept in ``$DATA_DIR/webhook_secret``.
Ctrl-C stops everything it started.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from devstack.processes import (
    HOST,
    Child,
    Supervisor,
    free_port,
    start_api,
    start_redis,
    start_s3,
    start_simulator,
    start_worker,
)
from services.config import load_config
from services.errors import ConfigError
from services.storage import Storage
from services.webhook_signing import load_or_create_secret

log = logging.getLogger("devstack")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s devstack: %(message)s")
    data_dir = Path(os.environ.get("DATA_DIR", "var")).resolve()
    log_dir = data_dir / "logs"
    env: dict[str, str] = {}
    children: list[Child] = []
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        load_config()  # fail fast on an invalid variable, before starting anything
        if not os.environ.get("REDIS_URL") and not os.environ.get("REDIS_SENTINELS"):
            port = free_port()
            children.append(start_redis(data_dir / "redis", port, log_dir=log_dir))
            env["REDIS_URL"] = f"redis://{HOST}:{port}/0"
            (data_dir / "redis_url").write_text(env["REDIS_URL"] + "\n")  # for `make flower`
            log.info("embedded Redis at %s (AOF persistence in %s)", env["REDIS_URL"], data_dir / "redis")
        if not os.environ.get("S3_ENDPOINT_URL"):
            port = free_port()
            children.append(start_s3(port, log_dir=log_dir))
            env["S3_ENDPOINT_URL"] = f"http://{HOST}:{port}"
            env.setdefault("AWS_ACCESS_KEY_ID", os.environ.get("AWS_ACCESS_KEY_ID", "embedded"))
            env.setdefault("AWS_SECRET_ACCESS_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY", "embedded"))
            log.warning(
                "embedded S3 server (moto) at %s: its data is NOT kept, outputs vanish when this stops; "
                "set S3_ENDPOINT_URL to use a real bucket",
                env["S3_ENDPOINT_URL"],
            )
        if not os.environ.get("UPSTREAM_BASE_URL"):
            port = free_port()
            sim_args = ["--latency-ms", os.environ.get("SIM_LATENCY_MS", "1500")]
            children.append(start_simulator(port, log_dir=log_dir, args=sim_args))
            env["UPSTREAM_BASE_URL"] = f"http://{HOST}:{port}"
            log.info(
                "upstream simulator at %s (set UPSTREAM_BASE_URL for a real one)", env["UPSTREAM_BASE_URL"]
            )
        api_port = int(os.environ.get("PORT", "8000"))
        if not os.environ.get("WEBHOOK_SIGNING_SECRET"):
            path = data_dir / "webhook_secret"
            env["WEBHOOK_SIGNING_SECRET"], created = load_or_create_secret(path)
            log.info(
                "webhook signing secret %s %s (verify webhooks with it; set WEBHOOK_SIGNING_SECRET to "
                "use your own)",
                "generated in" if created else "read from",
                path,
            )
        if not os.environ.get("PUBLIC_BASE_URL"):
            env["PUBLIC_BASE_URL"] = f"http://{HOST}:{api_port}"
        os.environ.update(env)
        config = load_config()
        Storage(config).ensure_bucket()
        embedded = list(children)
        supervisor = Supervisor()  # workers and the API come back if they exit, as under a process manager
        # Two workers on one host: each serves its metrics on a port of its own (WORKER_METRICS_PORT).
        metrics_ports = {"worker": free_port(), "webhook-worker": free_port()}
        for name, queues in (("worker", "generation"), ("webhook-worker", "webhooks")):
            worker_env = {**env, "WORKER_METRICS_PORT": str(metrics_ports[name])}
            children.append(
                supervisor.watch(start_worker(worker_env, log_dir=None, name=name, queues=queues))
            )
        api = start_api(env, api_port, log_dir=None, worker_class="gevent")  # as in the Docker image
        children.append(supervisor.watch(api))
        log.info(
            "imagegen-queue is up: http://%s:%d (logs of the embedded parts in %s)", HOST, api_port, log_dir
        )
        log.info(
            "metrics: http://%s:%d/metrics (the API and the queues), %s",
            HOST,
            api_port,
            ", ".join(f"http://{HOST}:{port}/metrics ({name})" for name, port in metrics_ports.items()),
        )
        while not stopping:
            dead = [child.name for child in embedded if not child.alive()]
            if dead:
                log.error("embedded %s stopped unexpectedly; shutting down", ", ".join(dead))
                return 1
            time.sleep(0.5)
        supervisor.stop()
        return 0
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except (TimeoutError, OSError) as exc:
        log.error("could not start: %s", exc)
        for child in children:
            if child.tail():
                log.error("%s's last lines:\n%s", child.name, child.tail())
        return 1
    finally:
        for child in reversed(children):
            child.stop()
        (data_dir / "redis_url").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
