"""Scenario ``p3``: our overhead after the upstream answers — until a client can see the result, and until
its webhook arrives.

A stack with a generation worker, a webhook worker and a receiver (``bench/webhook_latency.py``'s), the
simulator at L ± jitter with realistic 1.5 MB images, so that decoding and uploading are part of it. Each
of N jobs carries ``[sim key=p3-<n>]`` in its prompt (the simulator's ``GET /_sim/calls`` then says when
*that* job's answer was fully written: ``finished``) and a ``webhook_url``. Three figures per job, all on
this machine's clock:

- **store**: the task's ``finished_at`` (set by the worker in the write that makes it ``succeeded``)
  − the simulator's ``finished``: decode, upload, the store write; no polling involved;
- **GET**: the first ``GET /v1/tasks/{id}`` answer showing ``succeeded`` − ``finished``, measured on
  every ``--probe-every``-th job (a probe): its upstream call is pinned to exactly L (``delay_ms``); one
  watcher thread (at most ``--watch-rate`` GETs/s in all) notes when each probe's attempt began, and the
  probe's poller then waits until 60 ms before ``started_at`` + L and polls every ``--poll-ms``. A probe
  whose first fast poll already shows ``succeeded`` is counted as late and left out. This figure
  includes the API's answer time and the poll interval; the store figure above is the exact one;
- **webhook**: arrival at the receiver − ``finished``.

Targets: GET p99 < 100 ms, webhook p99 < 250 ms. A warm-up of one job per generation thread runs first
(threads, connections and pools are made on first use).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import threading
import time
from typing import Any

import httpx

from bench.common import add_common_arguments, finish, header, new_data, profile_dir, profiled, say
from bench.harness import (
    bench_stack,
    fmt,
    log_problems,
    markdown_table,
    parse_time,
    percentile,
    seed_body,
    submit_jobs,
    wait_all_final,
    wait_for_quiet,
)
from bench.webhook_latency import Receiver, start_webhook_worker
from devstack.processes import wait_until
from services.webhook_signing import generate_secret

DESCRIPTION = "P3: upstream answered → succeeded visible to GET (p99 < 100 ms) and → webhook (p99 < 250 ms)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=300, help="jobs (300)")
    parser.add_argument("--latency-ms", type=int, default=2000, help="simulator latency (2000)")
    parser.add_argument("--jitter-ms", type=int, default=1000, help="± jitter, so that answers spread (1000)")
    parser.add_argument("--image-bytes", type=int, default=1_500_000, help="image size (1500000)")
    parser.add_argument("--concurrency", type=int, default=50, help="generation worker threads (50)")
    parser.add_argument("--webhook-concurrency", type=int, default=50, help="webhook worker threads (50)")
    parser.add_argument("--probe-every", type=int, default=5, help="every n-th job is a GET probe (5)")
    parser.add_argument("--poll-ms", type=float, default=5, help="probe poll interval near the end (5)")
    parser.add_argument(
        "--watch-rate", type=float, default=40, help="GETs/s looking for probes that have started (40)"
    )
    parser.add_argument(
        "--warmup", type=int, default=0, help="jobs before measuring (0: one per generation thread)"
    )
    add_common_arguments(parser, quiet_wait=10)


def job_body(base: dict[str, Any], key: str, hook: str, delay_ms: int | None) -> dict[str, Any]:
    body = copy.deepcopy(base)
    directive = f"[sim key={key}" + (f" delay_ms={delay_ms}]" if delay_ms is not None else "]")
    body["contents"][0]["parts"][0]["text"] += " " + directive
    body["webhook_url"] = hook
    return body


class Probe(threading.Thread):
    """Polls one task fast from just before its pinned upstream end (``started`` + L − 60 ms)."""

    def __init__(self, api_url: str, task_id: str, latency_s: float, poll_s: float, deadline: float) -> None:
        super().__init__(daemon=True)
        self.api_url, self.task_id, self.latency_s, self.poll_s = api_url, task_id, latency_s, poll_s
        self.deadline = deadline
        self.started: float | None = None
        self.seen_at: float | None = None
        self.sent_at: float | None = None  # when the GET that saw ``succeeded`` was sent
        self.late = False
        self.polls = 0

    def run(self) -> None:
        assert self.started is not None
        time.sleep(max(0.0, self.started + self.latency_s - 0.06 - time.time()))
        first = True
        with httpx.Client(base_url=self.api_url, timeout=10) as client:
            while time.time() < self.deadline:
                self.polls += 1
                sent_at = time.time()
                task = client.get(f"/v1/tasks/{self.task_id}").json()
                if task["status"] == "succeeded":
                    self.seen_at = time.time()
                    self.sent_at = sent_at
                    self.late = first
                    return
                first = False
                time.sleep(self.poll_s)


def watch_starts(api_url: str, probes: list[Probe], rate: float, deadline: float) -> None:
    """One thread for all probes not started yet, at most ``rate`` GETs a second in all (so that the
    watching does not load the API it measures); starts each probe's fast poller once its attempt began."""
    pending = list(probes)
    with httpx.Client(base_url=api_url, timeout=10) as client:
        while pending and time.time() < deadline:
            for probe in list(pending):
                task = client.get(f"/v1/tasks/{probe.task_id}").json()
                if task["attempts"]:
                    probe.started = parse_time(task["attempts"][0]["started_at"])
                    probe.late = task["status"] != "running"
                    pending.remove(probe)
                    if not probe.late:
                        probe.start()
                time.sleep(1 / rate)
                if not pending:
                    break


def run(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in vars(args) if k not in ("no_write", "keep", "profile")}
    data = new_data("p3", params)
    secret = generate_secret()
    receiver = Receiver(secret)
    env = {
        "WEBHOOK_SIGNING_SECRET": secret,
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_ALLOW_HTTP": "true",
    }
    sim_args = ["--latency-ms", str(args.latency_ms), "--latency-jitter-ms", str(args.jitter_ms)]
    sim_args += ["--image-bytes", str(args.image_bytes), "--seed", "1"]
    latency_s = args.latency_ms / 1000
    base = seed_body()
    try:
        with bench_stack(sim_args=sim_args, env=env, keep=args.keep, snapshot=not args.live) as stack:
            say("p3", f"stack up in {stack.root}")
            generation = stack.start_worker("gen", pool="threads", concurrency=args.concurrency)
            hooks = start_webhook_worker(stack, "hooks", args.webhook_concurrency)
            warmup = args.warmup or args.concurrency
            if warmup:
                warm = [job_body(base, f"warm-{n}", receiver.url, None) for n in range(warmup)]
                submitted = submit_jobs(stack.api_url, warm)
                wait_all_final(stack.api_url, submitted.ids, timeout=120)
                wait_until(lambda: receiver.count() >= warmup, timeout=60, what="warm-up webhooks")
            stack.sim_reset()
            data["busy_before"] = wait_for_quiet(max_wait=args.quiet_wait) if args.quiet_wait else None
            keys = [f"p3-{n}" for n in range(args.jobs)]
            probes_at = set(range(0, args.jobs, args.probe_every)) if args.probe_every else set()
            bodies = [
                job_body(base, key, receiver.url, args.latency_ms if n in probes_at else None)
                for n, key in enumerate(keys)
            ]
            deadline = time.time() + 120 + 10 * args.jobs * latency_s / args.concurrency
            profiling = contextlib.ExitStack()
            if args.profile:
                workers = {"gen": generation.pid, "hooks": hooks.pid}
                profiling.enter_context(profiled(workers, profile_dir("p3", "workers")))
            submitted = submit_jobs(stack.api_url, bodies)
            probes = [
                Probe(stack.api_url, submitted.ids[n], latency_s, args.poll_ms / 1000, deadline)
                for n in sorted(probes_at)
                if n < len(submitted.ids)
            ]
            watcher = threading.Thread(
                target=watch_starts, args=(stack.api_url, probes, args.watch_rate, deadline), daemon=True
            )
            watcher.start()
            with profiling:
                _, final = wait_all_final(stack.api_url, submitted.ids, timeout=deadline - time.time())
            expected = {f"msg_{task_id}_succeeded" for task_id in submitted.ids}
            try:
                wait_until(lambda: expected <= set(receiver.arrivals), timeout=60, what="every webhook")
            except TimeoutError as exc:
                data["error"] = str(exc)
            watcher.join(30)
            for probe in probes:
                if probe.is_alive():
                    probe.join(30)
            calls = httpx.get(f"{stack.simulator_url}/_sim/calls", timeout=30).json()
            data["logs"] = {n: log_problems(stack.log_dir / f"{n}.log") for n in ("gen", "hooks")}
            data["pids"] = {"gen": generation.pid, "hooks": hooks.pid}
    finally:
        receiver.stop()

    finished_by_key = {c["key"]: c["finished"] for c in calls if c.get("key") in set(keys)}
    store_ms, webhook_ms, get_ms, probe_store_ms, probe_request_ms = [], [], [], [], []
    # per job: [upstream finished (epoch s), store ms]; per probe (below): [store, GET, its request] ms
    per_job: list[list[float]] = []
    probe_of = {p.task_id: p for p in probes}
    for key, task_id in zip(keys, submitted.ids, strict=False):
        task, upstream_done = final.get(task_id), finished_by_key.get(key)
        if not task or task["status"] != "succeeded" or upstream_done is None:
            continue
        store_ms.append(1000 * (parse_time(task["finished_at"]) - upstream_done))
        per_job.append([round(upstream_done, 4), round(store_ms[-1], 1)])
        arrivals = receiver.arrivals.get(f"msg_{task_id}_succeeded")
        if arrivals:
            webhook_ms.append(1000 * (min(arrivals) - upstream_done))
        probe = probe_of.get(task_id)
        if probe is not None and probe.seen_at is not None and not probe.late:
            get_ms.append(1000 * (probe.seen_at - upstream_done))
            probe_store_ms.append(store_ms[-1])
            probe_request_ms.append(1000 * (probe.seen_at - probe.sent_at))

    def spread(values: list[float]) -> dict[str, Any]:
        return {
            "n": len(values),
            "p50_ms": percentile(values, 50),
            "p90_ms": percentile(values, 90),
            "p99_ms": percentile(values, 99),
            "max_ms": max(values) if values else None,
        }

    data["results"] = {
        "tasks": len(submitted.ids),
        "succeeded": sum(1 for t in final.values() if t["status"] == "succeeded"),
        "matched_calls": len(finished_by_key),
        "store": spread(store_ms),
        "get": spread(get_ms),
        "get_probes_store": spread(probe_store_ms),
        "webhook": spread(webhook_ms),
        "probes": len(probes),
        "probes_late": sum(1 for p in probes if p.late),
        "probe_polls": sum(p.polls for p in probes),
        "unverified_signatures": receiver.unverified,
        "targets_ms": {"get_p99": 100, "webhook_p99": 250},
        "per_job": sorted(per_job),
        "get_request": spread(probe_request_ms),
        "per_probe": [
            [round(v, 1) for v in values]
            for values in zip(probe_store_ms, get_ms, probe_request_ms, strict=True)
        ],
    }
    finish(data, render, args)
    r = data["results"]
    return 0 if r["succeeded"] == r["tasks"] and not data.get("error") else 1


def render(data: dict[str, Any]) -> str:
    p, r = data["params"], data["results"]
    out = header(data, "P3: overhead after the upstream answered (`python -m bench p3`)")
    out += [
        f"{p['jobs']} jobs, latency {p['latency_ms']} ± {p['jitter_ms']} ms, "
        f"images {p['image_bytes'] / 1e6:g} MB, "
        f"generation worker {p['concurrency']} threads, webhook worker {p['webhook_concurrency']} threads; "
        f"every {p['probe_every']}th job a GET probe polled every {p['poll_ms']:g} ms near its end "
        f"({r['probes']} probes, {r['probes_late']} late and left out).",
        "",
        markdown_table(
            ["from the upstream's answer to", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "target"],
            [
                ["succeeded written (task finished_at)", *_row(r["store"]), "–"],
                ["the same, probes only", *_row(r["get_probes_store"]), "–"],
                ["succeeded seen by a GET (probes)", *_row(r["get"]), "p99 < 100"],
                ["  of which the request that saw it", *_row(r["get_request"]), "–"],
                ["webhook received", *_row(r["webhook"]), "p99 < 250"],
            ],
        ),
        "",
        f"{r['succeeded']}/{r['tasks']} succeeded; {r['matched_calls']} upstream calls matched by key; "
        f"{r['unverified_signatures']} bad signatures.",
        "",
    ]
    if data.get("error"):
        out += [f"**error:** {data['error']}", ""]
    return "\n".join(out)


def _row(s: dict[str, Any]) -> list[Any]:
    return [s["n"], fmt(s["p50_ms"], 1), fmt(s["p90_ms"], 1), fmt(s["p99_ms"], 1), fmt(s["max_ms"], 1)]
