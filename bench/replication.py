"""Scenario ``replication``: what ``REDIS_MIN_REPLICAS_ACK=1`` costs a submission, or a worker's closing
write (issue 13).

A redis-server primary and one replica (``replicaof``, both with AOF as ``make run`` runs Redis) on this
machine; in process, called by 1 and by 16 threads for ``--seconds`` each, with and without the option,
alternately, ``--rounds`` times, either (``--operation``)

- ``submit``: the API's submission path (``SubmissionService.submit``: validation, the idempotency claim,
  the create script, and with the option the ``WAIT 1`` in the same round trip); or
- ``close``: a worker's closing write (``JobStore.succeed`` of a started attempt, and with the option its
  ``WAIT 1``), timed alone: the task's creation and start before it are not.

No HTTP, no workers: the difference between the two settings is what the WAIT adds (the replica's
acknowledgement: one more hop, primary → replica → primary, before the answer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.common import finish, header, new_data, say
from bench.harness import markdown_table, seed_body
from devstack.processes import HOST, free_port, start_redis, wait_until
from services.config import load_config
from services.runtime import Runtime

DESCRIPTION = (
    "submissions (or closing writes) a second and their latency with and without REDIS_MIN_REPLICAS_ACK=1"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=4.0, help="each measurement (4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both settings (3)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 16], help="submitting threads (1 16)")
    parser.add_argument("--idempotency", action="store_true", help="send an Idempotency-Key with each")
    parser.add_argument(
        "--operation", choices=["submit", "close"], default="submit", help="what is timed (submit)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write into bench/results/")


def _operation(runtime: Runtime, plain: Runtime, name: str, idempotency: bool) -> Callable[[], float]:
    """One timed call of ``name`` on ``runtime``: its duration in seconds (an exception: refused)."""
    raw = json.dumps(seed_body()).encode()

    def submit() -> float:
        started = time.perf_counter()
        key = str(uuid.uuid4()) if idempotency else None
        runtime.submissions.submit(raw, idempotency_key=key, tenant="default")
        return time.perf_counter() - started

    def close() -> float:
        task = plain.store.create(model="m", payload=b"{}", metadata=None)
        attempt = plain.store.start_attempt(
            task["id"], worker="bench", lease_seconds=60, give_up=lambda _: None
        )
        assert attempt is not None
        started = time.perf_counter()
        runtime.store.succeed(attempt.lease, outputs=[], text=[], usage=None, upstream_status=200)
        return time.perf_counter() - started

    return submit if name == "submit" else close


def _measure(operation: Callable[[], float], threads: int, seconds: float) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(threads)]
    refused = [0] * threads
    stop = threading.Event()

    def submitter(number: int) -> None:
        mine = latencies[number]
        while not stop.is_set():
            try:
                mine.append(operation())
            except Exception:  # noqa: BLE001 - counted: a 503 when the replica did not answer in time
                refused[number] += 1

    workers = [threading.Thread(target=submitter, args=(number,)) for number in range(threads)]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)  # the measurement's length, not a synchronisation
    stop.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    merged = sorted(latency for mine in latencies for latency in mine)
    return {
        "threads": threads,
        "calls": len(merged),
        "per_second": len(merged) / elapsed,
        "p50_ms": 1000 * merged[len(merged) // 2],
        "p99_ms": 1000 * merged[int(len(merged) * 0.99)],
        "refused": sum(refused),
    }


def run(args: argparse.Namespace) -> int:
    data = new_data(
        "replication",
        {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "threads": args.threads,
            "idempotency": args.idempotency,
            "operation": args.operation,
        },
    )
    with tempfile.TemporaryDirectory(prefix="bench-replication-") as tmp:
        root = Path(tmp)
        primary_port, replica_port = free_port(), free_port()
        primary = start_redis(root / "a", primary_port, log_dir=root, name="redis-a")
        replica = start_redis(root / "b", replica_port, log_dir=root, name="redis-b", replicaof=primary_port)
        client = redis.Redis(host=HOST, port=primary_port)
        try:
            wait_until(
                lambda: client.info("replication").get("slave0", {}).get("state") == "online",
                timeout=30,
                what="the replica in sync",
            )
            env = {"REDIS_URL": f"redis://{HOST}:{primary_port}/0", "TENANT_MAX_QUEUED": "0"}
            runtimes = {
                "off": Runtime(load_config(env)),
                "WAIT 1": Runtime(load_config({**env, "REDIS_MIN_REPLICAS_ACK": "1"})),
            }
            rows: list[dict[str, Any]] = []
            for round_number in range(args.rounds):
                for threads in args.threads:
                    for setting, runtime in runtimes.items():
                        client.flushall()
                        operation = _operation(runtime, runtimes["off"], args.operation, args.idempotency)
                        result = _measure(operation, threads, args.seconds)
                        result.update(setting=setting, round=round_number + 1)
                        say("replication", f"{result}")
                        rows.append(result)
            data["rows"] = rows
            data["replication_info"] = {k: v for k, v in client.info("replication").items() if k != "slave0"}
        finally:
            client.close()
            replica.stop()
            primary.stop()
    finish(data, _render, args)
    return 0


def _render(data: dict[str, Any]) -> str:
    operation = data["params"].get("operation", "submit")
    lines = header(
        data, f"Scenario replication ({operation}): REDIS_MIN_REPLICAS_ACK=1 (WAIT) on a primary + replica"
    )
    summary = []
    for threads in data["params"]["threads"]:
        for setting in ("off", "WAIT 1"):
            rows = [r for r in data["rows"] if r["threads"] == threads and r["setting"] == setting]
            summary.append(
                [
                    threads,
                    setting,
                    round(statistics.median(r["per_second"] for r in rows)),
                    f"{min(r['per_second'] for r in rows):.0f}–{max(r['per_second'] for r in rows):.0f}",
                    statistics.median(r["p50_ms"] for r in rows),
                    statistics.median(r["p99_ms"] for r in rows),
                    sum(r["refused"] for r in rows),
                ]
            )
    lines.append(
        markdown_table(
            [
                "threads",
                "REDIS_MIN_REPLICAS_ACK",
                f"{operation} calls/s (median)",
                "range",
                "p50 ms",
                "p99 ms",
                "refused",
            ],
            summary,
        )
    )
    lines += ["", "Every measurement:", ""]
    lines.append(
        markdown_table(
            ["round", "threads", "setting", "calls", "per s", "p50 ms", "p99 ms", "refused"],
            [
                [
                    r["round"],
                    r["threads"],
                    r["setting"],
                    r["calls"],
                    r["per_second"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["refused"],
                ]
                for r in data["rows"]
            ],
        )
    )
    return "\n".join(lines) + "\n"
