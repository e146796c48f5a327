"""Scenarios ``p1a`` and ``p1b``: makespan of N jobs through the queue, against a floor from the same run.

- ``p1a``: small images (the simulator's smallest PNG, a few KB), so that the machine's CPU is not the
  limit: the floor is the ideal makespan N·L/C (every slot busy with an upstream call all the time).
  Target ≤ 1.05× ideal.
- ``p1b``: realistic 1.5 MB PNGs (about 2 MB of base64 per answer), where decoding and uploading cost
  real CPU: the floor is a bare client (``bench/bare_client.py``: asyncio + httpx, base64 decode, boto3
  upload, one process, no queue) making the same N calls at the same concurrency against the same
  simulator and S3 server, run alternately with the queue in the same stack. Target ≤ 1.15× the bare
  client's makespan.

Each round starts a fresh worker (threads pool, concurrency C), runs one warm-up wave of C jobs (not
measured: thread and connection start-up), then submits N jobs over HTTP and waits until all are final.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import types
from pathlib import Path
from typing import Any

from bench.common import (
    add_batch_arguments,
    add_common_arguments,
    bare_client_command,
    batch_line,
    finish,
    header,
    new_data,
    profile_dir,
    public,
    run_batch,
    say,
    submitter,
    worker_env,
)
from bench.harness import (
    BenchStack,
    bench_stack,
    fmt,
    markdown_table,
    median,
    percentile,
    seed_body,
    submit_jobs,
    wait_all_final,
)


def _add_arguments(parser: argparse.ArgumentParser, *, jobs: int, image_bytes: int, rounds: int) -> None:
    parser.add_argument("--jobs", type=int, default=jobs, help=f"jobs per measured batch ({jobs})")
    parser.add_argument("--latency-ms", type=int, default=2000, help="simulator latency (2000)")
    parser.add_argument("--jitter-ms", type=int, default=0, help="simulator latency ± jitter (0)")
    parser.add_argument("--concurrency", type=int, default=100, help="worker threads, C (100)")
    parser.add_argument(
        "--image-bytes", type=int, default=image_bytes, help=f"simulator image size ({image_bytes})"
    )
    parser.add_argument("--rounds", type=int, default=rounds, help=f"measured rounds ({rounds})")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up waves of C jobs per worker (1)")
    add_common_arguments(parser)
    add_batch_arguments(parser)


def _sim_args(args: argparse.Namespace) -> list[str]:
    return [
        "--latency-ms", str(args.latency_ms), "--latency-jitter-ms", str(args.jitter_ms),
        "--image-bytes", str(args.image_bytes), "--seed", "1",
    ]  # fmt: skip


def _params(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("jobs", "latency_ms", "jitter_ms", "concurrency", "image_bytes", "rounds", "warmup", "live")
    return {k: getattr(args, k) for k in keys} | {"worker_env": args.worker_env}


def queue_round(stack: BenchStack, args: argparse.Namespace, name: str, scenario: str) -> dict[str, Any]:
    """One fresh worker, a warm-up, one measured batch of ``args.jobs``."""
    latency_s = args.latency_ms / 1000
    worker = stack.start_worker(name, pool="threads", concurrency=args.concurrency, env=worker_env(args))
    body = seed_body()
    try:
        if args.warmup:
            warm = submit_jobs(stack.api_url, [body] * (args.warmup * args.concurrency), parallelism=16)
            wait_all_final(stack.api_url, warm.ids, timeout=120 + 10 * latency_s * args.warmup)
        result = run_batch(
            stack,
            {name: worker.pid},
            [body] * args.jobs,
            latency_s=latency_s,
            ideal_s=args.jobs * latency_s / args.concurrency,
            quiet_wait=args.quiet_wait,
            submit=submitter(args),
            profile_to=profile_dir(scenario, name) if args.profile else None,
        )
    finally:
        stack.stop_worker(name)
    result["kind"] = "queue"
    return public(result)


def bare_round(stack: BenchStack, args: argparse.Namespace) -> dict[str, Any]:
    """The bare client as its own process, against this stack's simulator and S3 server."""
    cmd = bare_client_command(stack, seed_body(), jobs=args.jobs, concurrency=args.concurrency)
    stack.sim_reset()
    from bench.harness import wait_for_quiet

    busy = wait_for_quiet(max_wait=args.quiet_wait) if args.quiet_wait > 0 else None
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600, check=False
    )
    if done.returncode != 0 and not done.stdout.strip():
        raise RuntimeError(f"bare client failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    sim = stack.sim_stats()
    spans = result.pop("job_seconds")
    return {
        "kind": "bare",
        "jobs": args.jobs,
        "makespan_s": result["makespan_s"],
        "cpu_s": result["cpu_s"],
        "cpu_per_job_ms": 1000 * result["cpu_s"] / max(1, args.jobs),
        "job_p50_s": percentile(spans, 50),
        "job_p99_s": percentile(spans, 99),
        "failures": result["error_count"] + (args.jobs - result["done"] - result["error_count"]),
        "errors": result["errors"],
        "busy_before": busy,
        "sim": {k: sim.get(k) for k in ("calls", "max_in_flight", "by_outcome")},
    }


# --------------------------------------------------------------------------------------------------
# p1a
# --------------------------------------------------------------------------------------------------


def run_p1a(args: argparse.Namespace) -> int:
    data = new_data("p1a", _params(args))
    data["runs"] = []
    with bench_stack(sim_args=_sim_args(args), keep=args.keep, snapshot=not args.live) as stack:
        say("p1a", f"stack up in {stack.root}")
        for round_no in range(args.rounds):
            result = queue_round(stack, args, f"p1a-r{round_no}", "p1a")
            result["round"] = round_no
            data["runs"].append(result)
            say("p1a", f"round {round_no}: {batch_line(result)}")
    ratios = [r["ratio"] for r in data["runs"]]
    data["summary"] = {
        "ideal_s": data["runs"][0]["ideal_s"],
        "makespan_s": median(r["makespan_s"] for r in data["runs"]),
        "ratio": median(ratios),
        "ratios": ratios,
        "target": 1.05,
        "failures": sum(r["failures"] for r in data["runs"]),
    }
    finish(data, render_p1a, args)
    return 0 if data["summary"]["failures"] == 0 else 1


def render_p1a(data: dict[str, Any]) -> str:
    p, s = data["params"], data["summary"]
    out = header(data, "P1a: makespan against the ideal N·L/C (`python -m bench p1a`)")
    out += [
        f"{p['jobs']} jobs, latency {p['latency_ms']} ± {p['jitter_ms']} ms, C = {p['concurrency']} threads, "
        f"image bytes {p['image_bytes']} (smallest when 0), {p['rounds']} round(s), fresh worker each with "
        f"{p['warmup']} warm-up wave(s).",
        "",
        f"**ratio {fmt(s['ratio'])}** (median; each round {', '.join(fmt(r) for r in s['ratios'])}) against "
        f"a target of ≤ {s['target']:.2f}; ideal {fmt(s['ideal_s'])} s, makespan {fmt(s['makespan_s'])} s.",
        "",
        _queue_table(data["runs"]),
        "",
    ]
    return "\n".join(out)


def _queue_table(runs: list[dict[str, Any]]) -> str:
    headers = [
        "round", "kind", "makespan s", "floor s", "ratio", "submit s", "overhead p50/p99 s", "wait p99 s",
        "worker CPU ms/job", "peak RSS MB", "max in flight", "CPU s sim/s3/api/redis", "foreign CPU s",
        "failures", "log",
    ]  # fmt: skip
    rows = []
    for r in runs:
        if r["kind"] == "bare":
            rows.append(
                [r.get("round"), "bare client", r["makespan_s"], "", "", "", "", "",
                 fmt(r["cpu_per_job_ms"], 1), "", r["sim"]["max_in_flight"], "", "", r["failures"], ""]
            )  # fmt: skip
            continue
        t, o = r["timings"], r["other_cpu_s"]
        counts = {k: v for log in r["worker_logs"].values() for k, v in log["counts"].items()}
        rows.append(
            [
                r.get("round"), "queue", r["makespan_s"], r.get("floor_s", r["ideal_s"]),
                r.get("floor_ratio", r["ratio"]), r["submit_s"],
                f"{fmt(t['overhead_p50_s'])} / {fmt(t['overhead_p99_s'])}", t["wait_p99_s"],
                fmt(r["cpu_per_job_ms"], 1), fmt(r["peak_rss_mb"], 0), r["sim"]["max_in_flight"],
                "/".join(fmt(o.get(k), 1) for k in ("simulator", "s3", "api", "redis")),
                fmt(r["machine"]["foreign_s"], 1),
                r["failures"] if not r.get("error") else f"{r['failures']} TIMEOUT",
                ", ".join(f"{k} {v}" for k, v in counts.items()) or "clean",
            ]
        )  # fmt: skip
    return markdown_table(headers, rows)


# --------------------------------------------------------------------------------------------------
# p1b
# --------------------------------------------------------------------------------------------------


def run_p1b(args: argparse.Namespace) -> int:
    data = new_data("p1b", _params(args))
    data["runs"] = []
    with bench_stack(sim_args=_sim_args(args), keep=args.keep, snapshot=not args.live) as stack:
        say("p1b", f"stack up in {stack.root}")
        for round_no in range(args.rounds):
            order = ("queue", "bare") if round_no % 2 == 0 else ("bare", "queue")
            pair: dict[str, dict[str, Any]] = {}
            for kind in order:
                if kind == "bare":
                    pair[kind] = bare_round(stack, args)
                    say("p1b", f"round {round_no} bare: makespan {fmt(pair[kind]['makespan_s'])}s")
                else:
                    pair[kind] = queue_round(stack, args, f"p1b-r{round_no}", "p1b")
                    say("p1b", f"round {round_no} queue: {batch_line(pair[kind])}")
                pair[kind]["round"] = round_no
            queue, bare = pair["queue"], pair["bare"]
            queue["floor_s"] = bare["makespan_s"]
            queue["floor_ratio"] = (
                queue["makespan_s"] / bare["makespan_s"]
                if queue["makespan_s"] and bare["makespan_s"]
                else None
            )
            data["runs"] += [pair[k] for k in order]
    queues = [r for r in data["runs"] if r["kind"] == "queue"]
    bares = [r for r in data["runs"] if r["kind"] == "bare"]
    data["summary"] = {
        "ideal_s": queues[0]["ideal_s"],
        "bare_makespan_s": median(r["makespan_s"] for r in bares),
        "makespan_s": median(r["makespan_s"] for r in queues),
        "ratio": median(r["floor_ratio"] for r in queues),
        "ratios": [r["floor_ratio"] for r in queues],
        "queue_cpu_ms_per_job": median(r["cpu_per_job_ms"] for r in queues),
        "bare_cpu_ms_per_job": median(r["cpu_per_job_ms"] for r in bares),
        "target": 1.15,
        "failures": sum(r["failures"] for r in data["runs"]),
    }
    finish(data, render_p1b, args)
    return 0 if data["summary"]["failures"] == 0 else 1


def render_p1b(data: dict[str, Any]) -> str:
    p, s = data["params"], data["summary"]
    out = header(data, "P1b: makespan against a bare client (`python -m bench p1b`)")
    out += [
        f"{p['jobs']} jobs, latency {p['latency_ms']} ± {p['jitter_ms']} ms, C = {p['concurrency']}, "
        f"images of about {p['image_bytes'] / 1e6:g} MB, {p['rounds']} round(s) (queue and bare client "
        "alternately, order reversed every round).",
        "",
        f"**ratio {fmt(s['ratio'])}** (median of queue/bare per round: "
        f"{', '.join(fmt(r) for r in s['ratios'])}) against a target of ≤ {s['target']:.2f}; bare client "
        f"{fmt(s['bare_makespan_s'])} s, queue {fmt(s['makespan_s'])} s, ideal N·L/C {fmt(s['ideal_s'])} s. "
        f"CPU per job: queue worker {fmt(s['queue_cpu_ms_per_job'], 1)} ms, bare client "
        f"{fmt(s['bare_cpu_ms_per_job'], 1)} ms.",
        "",
        _queue_table(data["runs"]),
        "",
        "floor = the bare client's makespan in the same round; makespan of the queue = last finished_at − "
        "first created_at (includes submission over HTTP); of the bare client = first call → last upload.",
        "",
    ]
    return "\n".join(out)


p1a = types.SimpleNamespace(
    DESCRIPTION="P1a: N jobs at concurrency C, small images: makespan against the ideal N·L/C (≤ 1.05)",
    add_arguments=lambda parser: _add_arguments(parser, jobs=400, image_bytes=0, rounds=2),
    run=run_p1a,
)
p1b = types.SimpleNamespace(
    DESCRIPTION="P1b: the same with 1.5 MB images, against a bare asyncio+httpx+boto3 client (≤ 1.15)",
    add_arguments=lambda parser: _add_arguments(parser, jobs=400, image_bytes=1_500_000, rounds=2),
    run=run_p1b,
)
