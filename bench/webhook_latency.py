"""Scenario ``webhook_latency``: how long after a task becomes ``succeeded`` its receiver gets the webhook.

A whole stack (Redis, S3, simulator, API), one generation worker and one webhook worker (``-Q webhooks``)
as real processes; a receiver (an HTTP server in this process, on a free port) that answers 200 at once,
notes when each request arrived and verifies its signature with ``standardwebhooks`` (the reference
implementation). N jobs, each with a ``webhook_url``, are submitted at once, so webhooks are delivered
while the generation worker is busy with the rest, in bursts of up to the worker's concurrency (every
job of a wave finishes at about the same time).

latency = arrival at the receiver (``time.time()``) − the task's ``finished_at`` (set by the worker in
the same atomic write that puts the event into the outbox); same machine, same clock.

    python -m bench webhook_latency [--jobs N] [--latency-ms L] [--concurrency C]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.harness import (
    BenchStack,
    Child,
    bench_stack,
    code_info,
    cpu_usage,
    fetch_tasks,
    log_problems,
    machine_info,
    machine_usage,
    markdown_table,
    parse_time,
    percentile,
    seed_body,
    submit_jobs,
    wait_all_final,
    wait_for_quiet,
    write_results,
)
from devstack.processes import HOST, wait_until
from services.webhook_signing import generate_secret

DESCRIPTION = "time from a task becoming succeeded to its webhook arriving at a receiver, p50/p99"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=600, help="jobs, each with a webhook (600)")
    parser.add_argument("--latency-ms", type=int, default=1500, help="simulated upstream latency (1500)")
    parser.add_argument(
        "--jitter-ms",
        type=int,
        default=1000,
        help="uniform ± jitter of that latency (1000), so that jobs finish spread out as with a real "
        "upstream; 0 makes every wave of C jobs finish at once (a burst of C webhooks)",
    )
    parser.add_argument("--concurrency", type=int, default=100, help="generation worker slots (100)")
    parser.add_argument("--webhook-concurrency", type=int, default=50, help="webhook worker slots (50)")
    parser.add_argument("--webhook-workers", type=int, default=1, help="webhook worker processes (1)")
    parser.add_argument(
        "--dispatch-interval-ms", type=int, default=50, help="WEBHOOK_DISPATCH_INTERVAL, in ms (50)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="jobs run before measuring (20)")
    parser.add_argument("--submit-parallelism", type=int, default=16, help="client threads that POST (16)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with every component's logs")
    parser.add_argument("--live", action="store_true", help="run the working tree, not a snapshot of it")
    parser.add_argument("--no-write", action="store_true", help="do not write into bench/results/")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the default listen backlog (5) drops SYNs of a burst: 1 s retransmits


class Receiver:
    """Answers 200 at once; records each request's arrival time and whether its signature verified."""

    def __init__(self, secret: str) -> None:
        try:
            from standardwebhooks import Webhook
        except ImportError:  # the test extras are not installed: count, do not verify
            Webhook = None  # noqa: N806
        self.verifier = Webhook(secret) if Webhook is not None else None
        self.arrivals: dict[str, list[float]] = {}
        self.bodies: dict[str, bytes] = {}
        self.unverified = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else a small answer can wait for a delayed ACK (~40 ms)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                arrived = time.time()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                receiver.record(dict(self.headers.items()), body, arrived)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Server((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self._server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def record(self, headers: dict[str, str], body: bytes, arrived: float) -> None:
        verified = True
        if self.verifier is not None:
            try:
                self.verifier.verify(body, headers)
            except Exception:  # noqa: BLE001 - counted
                verified = False
        msg_id = {k.lower(): v for k, v in headers.items()}.get("webhook-id", "?")
        with self._lock:
            self.arrivals.setdefault(msg_id, []).append(arrived)
            self.bodies.setdefault(msg_id, body)
            self.unverified += 0 if verified else 1

    def count(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_webhook_worker(stack: BenchStack, name: str, concurrency: int) -> Child:
    return stack.start_worker(name, pool="threads", concurrency=concurrency, queues="webhooks")


def run(args: argparse.Namespace) -> int:
    secret = generate_secret()
    receiver = Receiver(secret)
    env = {
        "WEBHOOK_SIGNING_SECRET": secret,
        "WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on 127.0.0.1
        "WEBHOOK_ALLOW_HTTP": "true",
        "WEBHOOK_DISPATCH_INTERVAL": str(args.dispatch_interval_ms / 1000),
    }
    params = {
        "jobs": args.jobs,
        "latency_ms": args.latency_ms,
        "jitter_ms": args.jitter_ms,
        "concurrency": args.concurrency,
        "webhook_concurrency": args.webhook_concurrency,
        "webhook_workers": args.webhook_workers,
        "warmup": args.warmup,
        "dispatch_interval_ms": args.dispatch_interval_ms,
    }
    data: dict[str, Any] = {
        "scenario": "webhook_latency",
        "command": "python -m bench webhook_latency " + " ".join(sys.argv[2:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "code": code_info(),
        "params": params,
    }
    body = {**seed_body(), "webhook_url": receiver.url}
    sim_args = ["--latency-ms", str(args.latency_ms), "--latency-jitter-ms", str(args.jitter_ms)]
    sim_args += ["--image-bytes", "0", "--seed", "1"]
    try:
        with bench_stack(sim_args=sim_args, env=env, keep=args.keep, snapshot=not args.live) as stack:
            _say(f"stack up in {stack.root}")
            generation = stack.start_worker("gen", pool="threads", concurrency=args.concurrency)
            hooks = [
                start_webhook_worker(stack, f"hooks{number}", args.webhook_concurrency)
                for number in range(args.webhook_workers)
            ]
            if args.warmup:
                warm = submit_jobs(stack.api_url, [body] * args.warmup, parallelism=args.submit_parallelism)
                wait_all_final(stack.api_url, warm.ids, timeout=120)
                wait_until(lambda: receiver.count() >= args.warmup, timeout=60, what="warm-up webhooks")
            seen_before = set(receiver.arrivals)
            data["busy_before"] = wait_for_quiet(max_wait=120)  # other work on the machine is noise
            load_before = os.getloadavg()
            pids = {"generation_worker": generation.pid, **{h.name: h.pid for h in hooks}}
            with cpu_usage(pids) as cpu, machine_usage() as machine:
                submitted = submit_jobs(
                    stack.api_url, [body] * args.jobs, parallelism=args.submit_parallelism
                )
                _say(f"submitted {len(submitted.ids)} jobs in {submitted.seconds:.1f}s")
                timeout = 120 + 10 * args.jobs * args.latency_ms / 1000 / args.concurrency
                _, final = wait_all_final(stack.api_url, submitted.ids, timeout=timeout)
                expected = {f"msg_{task_id}_succeeded" for task_id in submitted.ids}
                try:
                    wait_until(
                        lambda: expected <= set(receiver.arrivals),
                        timeout=60,
                        what="every webhook",
                        interval=0.2,
                    )
                except TimeoutError as exc:
                    data["error"] = str(exc)
            data["cpu_s"] = cpu
            data["machine_usage"] = machine
            logged = {task["id"]: task for task in fetch_tasks(stack.api_url, submitted.ids)}
            data["loadavg_before"] = list(load_before)
            data["worker_logs"] = {
                name: log_problems(stack.log_dir / f"{name}.log")
                for name in ("gen", *(h.name for h in hooks))
            }
    finally:
        receiver.stop()

    latencies: list[float] = []
    to_attempt: list[float] = []  # finished_at → the delivery attempt began (dispatch + queue + pickup)
    to_arrival: list[float] = []  # attempt began → arrival (payload, signature, HTTP)
    duplicates = 0
    for task_id in submitted.ids:
        arrivals = receiver.arrivals.get(f"msg_{task_id}_succeeded")
        task = final.get(task_id)
        if not arrivals or not task or task["status"] != "succeeded":
            continue
        duplicates += len(arrivals) - 1
        finished = parse_time(task["finished_at"])
        latencies.append(min(arrivals) - finished)
        attempts = [entry for entry in logged[task_id]["webhook"]["deliveries"] if entry["attempt"] == 1]
        if attempts:
            began = parse_time(attempts[0]["attempted_at"])
            to_attempt.append(began - finished)
            to_arrival.append(min(arrivals) - began)
    sample_id = next(iter(set(receiver.arrivals) - seen_before), None)
    data["results"] = {
        "tasks": len(submitted.ids),
        "succeeded": sum(1 for t in final.values() if t["status"] == "succeeded"),
        "webhooks_received": len(latencies),
        "duplicates": duplicates,
        "unverified_signatures": receiver.unverified,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p90_ms": _ms(percentile(latencies, 90)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "max_ms": _ms(max(latencies) if latencies else None),
        "min_ms": _ms(min(latencies) if latencies else None),
        "to_attempt_p50_ms": _ms(percentile(to_attempt, 50)),
        "to_attempt_p99_ms": _ms(percentile(to_attempt, 99)),
        "to_arrival_p50_ms": _ms(percentile(to_arrival, 50)),
        "to_arrival_p99_ms": _ms(percentile(to_arrival, 99)),
        "webhook_worker_cpu_ms_per_webhook": _ms(
            sum(v for k, v in data["cpu_s"].items() if k.startswith("hooks")) / max(1, len(latencies))
        ),
        "submit_s": submitted.seconds,
        "submit_errors": submitted.errors[:10],
    }
    if sample_id is not None:
        data["sample_payload"] = json.loads(receiver.bodies[sample_id])
    markdown = render(data)
    print(markdown)
    if not args.no_write:
        path = write_results("webhook_latency", data, markdown)
        _say(f"wrote {path} and {path.with_suffix('.md')} (and webhook_latency-latest.*)")
    results = data["results"]
    ok = (
        not data.get("error")
        and results["webhooks_received"] == results["tasks"] == args.jobs
        and results["unverified_signatures"] == 0
    )
    return 0 if ok else 1


def render(data: dict[str, Any]) -> str:
    r, p, m = data["results"], data["params"], data["machine"]
    lines = [
        "# webhook latency: task succeeded → receiver got the webhook",
        "",
        f"`{data['command']}` — {data['started']}, {m['cpus_usable']} CPUs, Python {m['python']}, "
        f"code {data['code']['commit']} (+{len(data['code']['uncommitted'])} uncommitted files)",
        "",
        f"{p['jobs']} jobs with a webhook each, submitted at once; simulator latency {p['latency_ms']} "
        f"± {p['jitter_ms']} ms; "
        f"generation worker {p['concurrency']} threads, {p['webhook_workers']} webhook worker(s) of "
        f"{p['webhook_concurrency']} threads; "
        f"dispatcher tick {p['dispatch_interval_ms']} ms.",
        "",
        markdown_table(
            ["N", "p50 ms", "p90 ms", "p99 ms", "max ms", "duplicates", "bad signatures"],
            [
                [
                    r["webhooks_received"],
                    r["p50_ms"],
                    r["p90_ms"],
                    r["p99_ms"],
                    r["max_ms"],
                    r["duplicates"],
                    r["unverified_signatures"],
                ]
            ],
        ),
        "",
        "Where the time goes (p50 / p99 ms): finished → delivery attempt began (dispatcher tick, Celery "
        f"message, pickup) {r['to_attempt_p50_ms']} / {r['to_attempt_p99_ms']}; attempt began → arrival "
        f"(payload, signature, POST) {r['to_arrival_p50_ms']} / {r['to_arrival_p99_ms']}. Webhook worker CPU "
        f"per webhook: {r['webhook_worker_cpu_ms_per_webhook']} ms. Machine busy before the run "
        f"{data['busy_before']:.0%}, during it {data['machine_usage']['busy_fraction']:.0%} of all CPUs "
        f"(load average before: {', '.join(f'{x:.2f}' for x in data['loadavg_before'])}).",
        "",
    ]
    if data.get("error"):
        lines += [f"**error:** {data['error']}", ""]
    return "\n".join(lines)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _say(message: str) -> None:
    print(f"[webhook_latency] {message}", file=sys.stderr, flush=True)
