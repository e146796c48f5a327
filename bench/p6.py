"""Scenario ``p6``: in-flight density: thousands of upstream calls held by one host's worker.

One worker process started as a user would, with ``WORKER_CONCURRENCY`` = C (default 2,000), the global
cap ``UPSTREAM_MAX_CONCURRENCY`` = C (so the limiter takes and renews a slot for every call, and binds at
exactly the density measured), leases of ``TASK_LEASE_SECONDS`` (default 30 s: renewed every 10 s, about
three times per call), small images, simulator latency L (default 30 s). After one warm-up wave of C short
jobs (threads and connections are made on first use), ``--waves`` × C jobs are submitted as batches of
1,000 (``POST /v1/batches``, as a client with thousands of jobs would) and followed until all are final.
Floor, in the same run: the ideal makespan N·L/C, and ``bench/bare_client.py`` (asyncio + httpx, one
process) making the same N calls with the same C in flight against the same simulator and S3 server.

Every 0.5 s the scenario records the worker's RSS (its whole process tree) and the simulator's calls in
flight, for the queue and for the bare client, and plots both curves (``bench/results/p6-*.png``).
Targets: ≥ C calls in flight, makespan ≤ 1.05× ideal, RSS of all worker processes ≤ 1.5 GiB, the cap
never exceeded, no task failed or retried, no lease lost (the worker's log is clean).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import threading
import time
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
    RESULTS_DIR,
    BenchStack,
    bench_stack,
    fmt,
    markdown_table,
    median,
    proc_stat,
    process_tree,
    seed_body,
    submit_batches,
    wait_all_final,
    wait_for_quiet,
)

DESCRIPTION = (
    "P6: 2,000 upstream calls in flight in one worker: ≤ 1.05× ideal, ≤ 1.5 GiB, against a bare client"
)
RSS_TARGET_MB = 1536
RATIO_TARGET = 1.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=2000, help="WORKER_CONCURRENCY, C (2000)")
    parser.add_argument("--waves", type=int, default=3, help="jobs = waves × C (3)")
    parser.add_argument("--latency-ms", type=int, default=30000, help="simulator latency L (30000)")
    parser.add_argument("--cap", type=int, default=0, help="UPSTREAM_MAX_CONCURRENCY (0: = C)")
    parser.add_argument("--lease-seconds", type=float, default=30, help="TASK_LEASE_SECONDS (30)")
    parser.add_argument(
        "--warmup-delay-ms", type=int, default=2000, help="latency of the warm-up wave (2000)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds, queue then bare client each (1)")
    parser.add_argument("--no-bare", action="store_true", help="leave the bare client out")
    add_common_arguments(parser, quiet_wait=10)
    add_batch_arguments(parser, submit="batches")


class Curves:
    """Samples a process tree's RSS and the simulator's calls in flight every ``interval`` seconds."""

    def __init__(self, stack: BenchStack, interval: float = 0.5) -> None:
        self.stack = stack
        self.interval = interval
        self.root: int | None = None
        self.points: list[tuple[float, float, int]] = []  # (seconds since start, RSS MB, in flight)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="p6-curves")
        self._started = 0.0

    def __enter__(self) -> Curves:
        self._started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = 0.0
            if self.root is not None:
                pids = process_tree(self.root)
                rss = sum(s.rss_bytes for pid in pids if (s := proc_stat(pid)) is not None) / 2**20
            try:
                in_flight = int(self.stack.sim_stats()["in_flight"])
            except Exception:  # noqa: BLE001 - a missed sample, not a failure
                continue
            self.points.append((round(time.time() - self._started, 2), round(rss, 1), in_flight))

    def summary(self) -> dict[str, Any]:
        held = [p for p in self.points if p[2] > 0]
        return {
            "peak_rss_mb": max((p[1] for p in self.points), default=None),
            "peak_in_flight": max((p[2] for p in self.points), default=None),
            "seconds_at_full": self.interval * sum(1 for p in held if p[2] >= 0.99 * max(q[2] for q in held)),
            "points": self.points,
        }


def _body(delay_ms: int | None = None) -> dict[str, Any]:
    body = seed_body()
    if delay_ms is not None:  # the simulator's own directive: this call's latency
        body = copy.deepcopy(body)
        body["contents"][0]["parts"][0]["text"] += f" [sim delay_ms={delay_ms}]"
    return body


def queue_round(stack: BenchStack, args: argparse.Namespace, name: str) -> dict[str, Any]:
    c, latency_s = args.concurrency, args.latency_ms / 1000
    worker = stack.start_worker(name, pool="threads", concurrency=c, env=worker_env(args), ready_timeout=120)
    try:
        warm = submit_batches(stack.api_url, [_body(args.warmup_delay_ms)] * c)
        wait_all_final(stack.api_url, warm.ids, timeout=300)
        with Curves(stack) as curves:
            curves.root = worker.pid
            result = run_batch(
                stack,
                {name: worker.pid},
                [_body()] * (args.waves * c),
                latency_s=latency_s,
                ideal_s=args.waves * latency_s,
                quiet_wait=args.quiet_wait,
                submit=submitter(args),
                profile_to=profile_dir("p6", name) if args.profile else None,
                timeout=600 + 4 * args.waves * latency_s,
            )
    finally:
        stack.stop_worker(name)
    result["kind"] = "queue"
    result["curves"] = curves.summary()
    return public(result)


def bare_round(stack: BenchStack, args: argparse.Namespace) -> dict[str, Any]:
    """The bare client as its own process, holding C calls, sampled like the worker."""
    c, jobs = args.concurrency, args.waves * args.concurrency
    options = ["--prefix", "p6-bare", "--client-per-slot"]
    cmd = bare_client_command(stack, _body(), jobs=jobs, concurrency=c, options=options)
    stack.sim_reset()
    busy = wait_for_quiet(max_wait=args.quiet_wait) if args.quiet_wait > 0 else None
    with Curves(stack) as curves:
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        curves.root = process.pid
        out, err = process.communicate(timeout=600 + 4 * args.waves * args.latency_ms / 1000)
    if not out.strip():
        raise RuntimeError(f"bare client failed:\n{err[-2000:]}")
    result = json.loads(out)
    sim = stack.sim_stats()
    ideal = args.waves * args.latency_ms / 1000
    return {
        "kind": "bare",
        "jobs": jobs,
        "ideal_s": ideal,
        "makespan_s": result["makespan_s"],
        "ratio": result["makespan_s"] / ideal if result["makespan_s"] else None,
        "cpu_s": result["cpu_s"],
        "cpu_per_job_ms": 1000 * result["cpu_s"] / max(1, jobs),
        "failures": result["error_count"] + (jobs - result["done"] - result["error_count"]),
        "errors": result["errors"],
        "busy_before": busy,
        "sim": {k: sim.get(k) for k in ("calls", "max_in_flight", "by_outcome")},
        "curves": curves.summary(),
    }


def run(args: argparse.Namespace) -> int:
    cap = args.cap or args.concurrency
    params = {k: getattr(args, k) for k in ("concurrency", "waves", "latency_ms", "lease_seconds", "rounds")}
    data = new_data("p6", params | {"cap": cap, "worker_env": args.worker_env})
    data["runs"] = []
    env = {"UPSTREAM_MAX_CONCURRENCY": str(cap), "TASK_LEASE_SECONDS": str(args.lease_seconds)}
    sim_args = ["--latency-ms", str(args.latency_ms), "--image-bytes", "0", "--seed", "1"]
    with bench_stack(sim_args=sim_args, env=env, keep=args.keep, snapshot=not args.live) as stack:
        say("p6", f"stack up in {stack.root}")
        for round_no in range(args.rounds):
            result = queue_round(stack, args, f"p6-r{round_no}")
            result["round"] = round_no
            data["runs"].append(result)
            say("p6", f"round {round_no} queue: {batch_line(result)}")
            if not args.no_bare:
                bare = bare_round(stack, args)
                bare["round"] = round_no
                data["runs"].append(bare)
                say(
                    "p6",
                    f"round {round_no} bare: makespan={fmt(bare['makespan_s'])}s ratio={fmt(bare['ratio'])} "
                    f"rss={fmt(bare['curves']['peak_rss_mb'], 0)}MB in_flight={bare['sim']['max_in_flight']}",
                )
    queue = [r for r in data["runs"] if r["kind"] == "queue"]
    bare_runs = [r for r in data["runs"] if r["kind"] == "bare"]
    data["summary"] = {
        "ideal_s": queue[0]["ideal_s"],
        "ratio": median(r["ratio"] for r in queue),
        "bare_ratio": median(r["ratio"] for r in bare_runs) if bare_runs else None,
        "peak_rss_mb": max(r["curves"]["peak_rss_mb"] or 0 for r in queue),
        "bare_peak_rss_mb": max((r["curves"]["peak_rss_mb"] or 0 for r in bare_runs), default=None),
        "max_in_flight": min(r["sim"]["max_in_flight"] for r in queue),
        "cap": cap,
        "failures": sum(r["failures"] for r in data["runs"]),
        "retried": sum(r["timings"]["retried_tasks"] for r in queue),
        "log_problems": [r["worker_logs"] for r in queue],
    }
    s = data["summary"]
    s["met"] = (
        s["ratio"] <= RATIO_TARGET and s["peak_rss_mb"] <= RSS_TARGET_MB
        and args.concurrency <= s["max_in_flight"] <= cap and s["failures"] == 0
    )  # fmt: skip
    data["plot"] = plot(data, args)
    finish(data, render, args)
    return 0 if s["failures"] == 0 else 1


def render(data: dict[str, Any]) -> str:
    p, s = data["params"], data["summary"]
    out = header(data, "P6: calls in flight in one worker (`python -m bench p6`)")
    out += [
        f"C = {p['concurrency']} (`WORKER_CONCURRENCY`, threads), cap `UPSTREAM_MAX_CONCURRENCY` = "
        f"{p['cap']}, {p['waves']} waves of C jobs at L = {p['latency_ms']} ms, small images, leases of "
        f"{p['lease_seconds']} s; submitted as batches of 1,000; {p['rounds']} round(s), queue then bare "
        "client.",
        "",
        f"**queue {fmt(s['ratio'])}× ideal** (bare client {fmt(s['bare_ratio'])}×), target ≤ {RATIO_TARGET}; "
        f"ideal {fmt(s['ideal_s'])} s; worker peak RSS **{fmt(s['peak_rss_mb'], 0)} MB** (bare client "
        f"{fmt(s['bare_peak_rss_mb'], 0)} MB), target ≤ {RSS_TARGET_MB}; max in flight {s['max_in_flight']} "
        f"(cap {s['cap']}); failures {s['failures']}, retried {s['retried']}.",
        "",
    ]
    headers = [
        "round", "kind", "makespan s", "ideal s", "ratio", "submit s", "wait p99 s", "overhead p50/p99 s",
        "CPU ms/job", "peak RSS MB", "max in flight", "failures", "log",
    ]  # fmt: skip
    rows = []
    for r in data["runs"]:
        if r["kind"] == "bare":
            rows.append([
                r["round"], "bare client", fmt(r["makespan_s"]), fmt(r["ideal_s"]), fmt(r["ratio"]), "", "",
                "", fmt(r["cpu_per_job_ms"], 1), fmt(r["curves"]["peak_rss_mb"], 0),
                r["sim"]["max_in_flight"], r["failures"], "",
            ])  # fmt: skip
            continue
        t = r["timings"]
        logs = "; ".join(f"{k} {v}" for w in r["worker_logs"].values() for k, v in w.items() if v) or "clean"
        rows.append([
            r["round"], "queue", fmt(r["makespan_s"]), fmt(r["ideal_s"]), fmt(r["ratio"]), fmt(r["submit_s"]),
            fmt(t["wait_p99_s"]), f"{fmt(t['overhead_p50_s'])} / {fmt(t['overhead_p99_s'])}",
            fmt(r["cpu_per_job_ms"], 1), fmt(r["curves"]["peak_rss_mb"], 0), r["sim"]["max_in_flight"],
            r["failures"], logs,
        ])  # fmt: skip
    out += [markdown_table(headers, rows), ""]
    if data.get("plot"):
        out += [f"![P6: RSS and calls in flight]({Path(data['plot']).name})", ""]
    return "\n".join(out)


def plot(data: dict[str, Any], args: argparse.Namespace) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("p6", "matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), dpi=120, sharex=True)
    for r in data["runs"]:
        points = r["curves"]["points"]
        label = f"{'queue (worker)' if r['kind'] == 'queue' else 'bare client'}, round {r['round']}"
        top.plot([p[0] for p in points], [p[2] for p in points], label=label)
        bottom.plot([p[0] for p in points], [p[1] for p in points], label=label)
    top.axhline(data["summary"]["cap"], color="grey", linewidth=0.6, linestyle="--", label="cap")
    top.set_ylabel("upstream calls in flight")
    bottom.axhline(RSS_TARGET_MB, color="red", linewidth=0.6, linestyle="--", label="1.5 GiB target")
    bottom.set_ylabel("RSS MB (whole process tree)")
    bottom.set_xlabel("seconds since the sampling began")
    top.set_title(f"P6: C = {args.concurrency}, L = {args.latency_ms / 1000:g} s, {args.waves} waves")
    top.legend(fontsize=7)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    if args.no_write:
        plt.close(fig)
        return None
    path = RESULTS_DIR / f"p6-{time.strftime('%Y%m%d-%H%M%S')}.png"
    fig.savefig(path)
    plt.close(fig)
    return str(path)
