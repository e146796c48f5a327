"""Scenario ``p3``: our overhead after the upstream answers — until a client can see the result, and until
its webhook arrives.

A stack with a generation worker, a webhook worker and a receiver (``bench/webhook_latency.py``'s), the
simulator at L ± jitter with realistic 1.5 MB images, so that decoding and uploading are part of it. Each
of N jobs carries ``[sim key=p3-<n>]`` in its prompt (the simulator's ``GET /_sim/calls`` then says when
*that* job's answer was fully written: ``finished``) and a ``webhook_url``. Three figures per job, all on
this machine's clock:

- **store**: the task's ``finished_at`` (set by the worker in the write that makes it ``succeeded``)
  − the simulator's ``finished``: decode, upload, the store write; no polling involved;
- **seen**: on every ``--probe-every``-th job (a probe; by default every job), the arrival of the
  ``succeeded`` event on the task's event stream (``GET /v1/tasks/{id}/events``, opened as soon as the
  task is accepted; the API runs under gunicorn's gevent workers, as the Dockerfile deploys it)
  − ``finished``: when a client that waits sees the result. The streams are followed by a process of
  their own (``bench/sse_probe.py``): followed by threads of this one, each arrival also waited for this
  process's GIL, shared with the webhook receiver and the poller, and with 300 probes the p99 of both
  "seen" and "webhook" was 5–7 times what it is;
- **webhook**: arrival at the receiver − ``finished``.

The floor, in the same run against the same simulator and S3 server: ``bench/bare_client.py`` makes the
same N calls at the same concurrency and reports, per job, its own **tail**: from its last byte of the
answer to its upload done (decode, the sha256 check, the upload). Targets: store p99 ≤ the bare tail's
p99 + 20 ms; seen p99 ≤ that + 10 ms. A warm-up of one job per generation thread runs first (threads,
connections and pools are made on first use).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import time
from typing import Any

import httpx

from bench.common import (
    add_common_arguments,
    bare_client_command,
    finish,
    header,
    new_data,
    profile_dir,
    profiled,
    say,
)
from bench.harness import (
    ROOT,
    BenchStack,
    bench_stack,
    fmt,
    log_problems,
    markdown_table,
    parse_time,
    percentile,
    process_tree,
    seed_body,
    submit_jobs,
    wait_all_final,
    wait_for_quiet,
)
from bench.webhook_latency import Receiver, start_webhook_worker
from devstack.processes import wait_until
from services.webhook_signing import generate_secret

DESCRIPTION = (
    "P3: upstream answered → succeeded stored, seen on its event stream, webhook; against a bare tail"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=300, help="jobs (300)")
    parser.add_argument("--latency-ms", type=int, default=2000, help="simulator latency (2000)")
    parser.add_argument("--jitter-ms", type=int, default=1000, help="± jitter, so that answers spread (1000)")
    parser.add_argument("--image-bytes", type=int, default=1_500_000, help="image size (1500000)")
    parser.add_argument("--concurrency", type=int, default=50, help="generation worker threads (50)")
    parser.add_argument("--webhook-concurrency", type=int, default=50, help="webhook worker threads (50)")
    parser.add_argument(
        "--probe-every", type=int, default=1, help="every n-th job followed on its stream (1: all)"
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


def start_probes(api_url: str, task_ids: list[str], deadline: float) -> subprocess.Popen[str]:
    """The probes' process (``bench/sse_probe.py``), following the streams of ``task_ids``."""
    cmd = [sys.executable, "-m", "bench.sse_probe", api_url, repr(deadline)]
    probes = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert probes.stdin is not None
    probes.stdin.write(json.dumps(task_ids))
    probes.stdin.close()
    return probes


def probe_results(probes: subprocess.Popen[str]) -> dict[str, Any]:
    """What the probes' process says, once its streams have ended."""
    assert probes.stdout is not None and probes.stderr is not None
    out = probes.stdout.read()
    err = probes.stderr.read()
    probes.wait(30)
    if not out.strip():
        raise RuntimeError(f"the probes' process failed:\n{err[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


def bare_tail(stack: BenchStack, args: argparse.Namespace) -> dict[str, Any]:
    """The bare client against this stack: the same jobs, the same concurrency, after a warm-up as the
    worker's; its per-job tail."""
    options = ["--client-per-slot", "--prefix", "p3", "--warmup", str(args.concurrency)]
    cmd = bare_client_command(
        stack, seed_body(), jobs=args.jobs, concurrency=args.concurrency, options=options
    )
    stack.sim_reset()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    if not done.stdout.strip():
        raise RuntimeError(f"bare client failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    return {"errors": result["error_count"], "tail": [1000 * t for t in result["tail_seconds"]]}


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
        with bench_stack(
            sim_args=sim_args, env=env, keep=args.keep, snapshot=not args.live, api_worker_class="gevent"
        ) as stack:
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
            bodies = [job_body(base, key, receiver.url, None) for key in keys]
            deadline = time.time() + 120 + 10 * args.jobs * latency_s / args.concurrency
            profiling = contextlib.ExitStack()
            if args.profile:
                api = {f"api-{pid}": pid for pid in process_tree(stack.children["api"].pid)[1:]}
                workers = {"gen": generation.pid, "hooks": hooks.pid, **api}
                profiling.enter_context(profiled(workers, profile_dir("p3", "workers")))
            submitted = submit_jobs(stack.api_url, bodies)
            probes = start_probes(stack.api_url, [submitted.ids[n] for n in sorted(probes_at)], deadline)
            with profiling:
                _, final = wait_all_final(stack.api_url, submitted.ids, timeout=deadline - time.time())
            expected = {f"msg_{task_id}_succeeded" for task_id in submitted.ids}
            try:
                wait_until(lambda: expected <= set(receiver.arrivals), timeout=60, what="every webhook")
            except TimeoutError as exc:
                data["error"] = str(exc)
            probed = probe_results(probes)
            calls = httpx.get(f"{stack.simulator_url}/_sim/calls", timeout=30).json()
            bare = bare_tail(stack, args)
            data["logs"] = {n: log_problems(stack.log_dir / f"{n}.log") for n in ("gen", "hooks")}
            data["pids"] = {"gen": generation.pid, "hooks": hooks.pid}
    finally:
        receiver.stop()

    finished_by_key = {c["key"]: c["finished"] for c in calls if c.get("key") in set(keys)}
    store_ms: list[float] = []
    webhook_ms: list[float] = []
    seen_ms: list[float] = []
    probe_store_ms: list[float] = []
    # per job: [upstream finished (epoch s), store ms]; per probe (below): [store, seen] ms
    per_job: list[list[float]] = []
    seen_at: dict[str, float | None] = probed["seen"]
    for key, task_id in zip(keys, submitted.ids, strict=False):
        task, upstream_done = final.get(task_id), finished_by_key.get(key)
        if not task or task["status"] != "succeeded" or upstream_done is None:
            continue
        store_ms.append(1000 * (parse_time(task["finished_at"]) - upstream_done))
        per_job.append([round(upstream_done, 4), round(store_ms[-1], 1)])
        arrivals = receiver.arrivals.get(f"msg_{task_id}_succeeded")
        if arrivals:
            webhook_ms.append(1000 * (min(arrivals) - upstream_done))
        seen = seen_at.get(task_id)
        if seen is not None:
            seen_ms.append(1000 * (seen - upstream_done))
            probe_store_ms.append(store_ms[-1])

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
        "seen": spread(seen_ms),
        "probes_store": spread(probe_store_ms),
        "webhook": spread(webhook_ms),
        "bare_tail": spread(bare["tail"]),
        "bare_errors": bare["errors"],
        "probes": len(seen_at),
        "probes_unseen": sum(1 for seen in seen_at.values() if seen is None),
        "probe_errors": list(probed["errors"].values())[:5],
        "unverified_signatures": receiver.unverified,
        "per_job": sorted(per_job),
        "per_probe": [[round(v, 1) for v in values] for values in zip(probe_store_ms, seen_ms, strict=True)],
    }
    r = data["results"]
    floor = r["bare_tail"]["p99_ms"] or 0.0
    r["targets_ms"] = {"store_p99": floor + 20, "seen_p99": floor + 30, "webhook_p99": 250}
    finish(data, render, args)
    return 0 if r["succeeded"] == r["tasks"] and not data.get("error") else 1


def render(data: dict[str, Any]) -> str:
    p, r = data["params"], data["results"]
    t = r["targets_ms"]
    out = header(data, "P3: overhead after the upstream answered (`python -m bench p3`)")
    out += [
        f"{p['jobs']} jobs, latency {p['latency_ms']} ± {p['jitter_ms']} ms, "
        f"images {p['image_bytes'] / 1e6:g} MB, "
        f"generation worker {p['concurrency']} threads, webhook worker {p['webhook_concurrency']} threads; "
        f"every {p['probe_every']}th job followed on its event stream ({r['probes']} probes, "
        f"{r['probes_unseen']} without their event). Floor: the bare client's own tail (last byte of the "
        "answer → decode, sha256, upload done), same jobs, same concurrency, same run.",
        "",
        markdown_table(
            ["from the upstream's answer to", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "target p99"],
            [
                ["bare client: its upload done (the floor)", *_row(r["bare_tail"]), "–"],
                ["succeeded written (task finished_at)", *_row(r["store"]), fmt(t["store_p99"], 1)],
                ["the same, probes only", *_row(r["probes_store"]), "–"],
                ["succeeded seen on the event stream", *_row(r["seen"]), fmt(t["seen_p99"], 1)],
                ["webhook received", *_row(r["webhook"]), fmt(t["webhook_p99"], 1)],
            ],
        ),
        "",
        f"{r['succeeded']}/{r['tasks']} succeeded; {r['matched_calls']} upstream calls matched by key; "
        f"{r['unverified_signatures']} bad signatures; bare client errors {r['bare_errors']}.",
        "",
    ]
    if data.get("error"):
        out += [f"**error:** {data['error']}", ""]
    return "\n".join(out)


def _row(s: dict[str, Any]) -> list[Any]:
    return [s["n"], fmt(s["p50_ms"], 1), fmt(s["p90_ms"], 1), fmt(s["p99_ms"], 1), fmt(s["max_ms"], 1)]
