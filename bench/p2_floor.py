"""The P2 floor: a minimal Flask handler that does only the Redis writes of a submission.

What ``POST /v1/images/generations`` costs at the least on the same server (gunicorn, same workers and
threads) and the same Redis: read the body, write the task and its payload and the index entries in one
transaction with a message pushed onto a queue (``JobStore.create``: SET, SET, SADD, ZADD, LPUSH), answer
202 with the id. No validation, no task record of ours, no message format: the least a submission costs.

    gunicorn --pythonpath REPO 'bench.p2_floor:create_app()'   # REDIS_URL, KEY_PREFIX from the env
"""

from __future__ import annotations

import json
import os
import time
import uuid

import redis
from flask import Flask, Response, request


def create_app() -> Flask:
    app = Flask(__name__)
    client = redis.Redis.from_url(os.environ["REDIS_URL"], max_connections=64)
    prefix = os.environ.get("KEY_PREFIX", "iq") + "-floor"

    @app.post("/v1/images/generations")
    def submit() -> Response:
        payload = request.get_data()
        task_id = str(uuid.uuid4())
        now = time.time()
        task = {"id": task_id, "status": "queued", "created_at": now}
        pipe = client.pipeline(transaction=True)
        pipe.set(f"{prefix}:payload:{task_id}", payload)
        pipe.set(f"{prefix}:task:{task_id}", json.dumps(task))
        pipe.sadd(f"{prefix}:active", task_id)
        pipe.zadd(f"{prefix}:queued", {task_id: round(now * 1000)})
        pipe.lpush(f"{prefix}:queue", json.dumps({"id": task_id}))
        pipe.execute()
        body = json.dumps({"id": task_id, "status": "queued"})
        return Response(body, status=202, mimetype="application/json")

    return app
