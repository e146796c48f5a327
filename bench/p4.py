"""Scenario ``p4``: the worker's memory with big images in flight, and over many small jobs.

Part 1, peak: one worker with C = 8 threads, the simulator answering 4K images of about 10 MB (about
13 MB of base64 in the JSON), latency L, no jitter: the 8 calls of a wave return together, so that 8
answers are decoded and uploaded at the same time. A fresh worker's RSS is read before the first job
(its baseline: the process as it is ready to work), then sampled every 20 ms over ``--waves`` waves of 8
jobs. growth per in-flight image = (peak RSS − baseline) / 8, against the image's own size (its decoded
bytes). Target ≤ 2.5×: the answer must be read and decoded without extra copies.

Part 2, slope: another fresh worker runs ``--small-jobs`` jobs with the smallest images (C = 50, short
latency). RSS is sampled every 0.5 s together with the number of tasks finished so far; the slope of a
least-squares line through RSS against jobs done, after the first 20 % (allocator and pool warm-up), is
reported in KB per 1,000 jobs, and the RSS at 20 % and at the end. Target: flat.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from bench.common import add_common_arguments, finish, header, new_data, say
from bench.harness import (
    bench_stack,
    fetch_tasks,
    fmt,
    log_problems,
    markdown_table,
    parse_time,
    proc_stat,
    process_tree,
    seed_body,
    submit_jobs,
    wait_all_final,
    wait_for_quiet,
)

DESCRIPTION = "P4: worker RSS growth per in-flight 4K image (≤ 2.5× its size); RSS slope over many small jobs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-bytes", type=int, default=10_000_000, help="4K image size (10000000)")
    parser.add_argument("--concurrency", type=int, default=8, help="worker threads, images in flight (8)")
    parser.add_argument("--waves", type=int, default=3, help="waves of C big jobs (3)")
    parser.add_argument("--latency-ms", type=int, default=2000, help="simulator latency, big images (2000)")
    parser.add_argument(
        "--small-jobs", type=int, default=2000, help="jobs of the RSS-slope part (2000; 0 skips it)"
    )
    parser.add_argument("--small-concurrency", type=int, default=50, help="worker threads, slope part (50)")
    parser.add_argument("--small-latency-ms", type=int, default=50, help="simulator latency, slope part (50)")
    add_common_arguments(parser, quiet_wait=10)


def big_body() -> dict[str, Any]:
    body = seed_body()
    body["model"] = "gemini-3-pro-image-preview"
    body["generationConfig"]["imageConfig"]["imageSize"] = "4K"
    return body


def tree_rss_mb(pid: int) -> float:
    return sum(s.rss_bytes for p in process_tree(pid) if (s := proc_stat(p)) is not None) / 2**20


class RssSampler:
    """The process tree's RSS every ``interval`` s, as (time.time(), MB) pairs."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), tree_rss_mb(self.pid)))
            self._stop.wait(self.interval)

    @property
    def peak(self) -> float:
        return max((mb for _, mb in self.samples), default=0.0)


def peak_part(args: argparse.Namespace) -> dict[str, Any]:
    sim_args = ["--latency-ms", str(args.latency_ms), "--image-bytes", str(args.image_bytes), "--seed", "1"]
    with bench_stack(sim_args=sim_args, keep=args.keep, snapshot=not args.live) as stack:
        say("p4", f"peak: stack up in {stack.root}")
        worker = stack.start_worker("p4-big", pool="threads", concurrency=args.concurrency)
        try:
            stack.sim_reset()
            busy = wait_for_quiet(max_wait=args.quiet_wait) if args.quiet_wait > 0 else None
            time.sleep(1.0)  # let the worker settle after "ready." (the sweeper's first ticks)
            baseline = tree_rss_mb(worker.pid)
            body = big_body()
            jobs = args.concurrency * args.waves
            with RssSampler(worker.pid, 0.02) as sampler:
                submitted = submit_jobs(stack.api_url, [body] * jobs, parallelism=args.concurrency)
                _, final = wait_all_final(
                    stack.api_url, submitted.ids, timeout=120 + 20 * args.waves * args.latency_ms / 1000
                )
            hwm = _hwm_mb(worker.pid)
            sim = stack.sim_stats()
            log = log_problems(stack.log_dir / "p4-big.log")
        finally:
            stack.stop_worker("p4-big")
    tasks = list(final.values())
    sizes = [o["bytes"] for t in tasks for o in t.get("outputs", [])]
    image_mb = (sum(sizes) / len(sizes) / 2**20) if sizes else None
    growth = sampler.peak - baseline
    per_image = growth / args.concurrency
    return {
        "jobs": jobs,
        "concurrency": args.concurrency,
        "succeeded": sum(1 for t in tasks if t["status"] == "succeeded"),
        "failures": len(submitted.errors) + sum(1 for t in tasks if t["status"] != "succeeded"),
        "image_mb": image_mb,
        "width_height": [tasks[0]["outputs"][0].get("width"), tasks[0]["outputs"][0].get("height")]
        if tasks and tasks[0].get("outputs")
        else None,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": sampler.peak,
        "vm_hwm_mb": hwm,
        "growth_mb": growth,
        "growth_per_image_mb": per_image,
        "ratio": per_image / image_mb if image_mb else None,
        "target": 2.5,
        "max_in_flight": sim.get("max_in_flight"),
        "busy_before": busy,
        "rss_series": [(round(t - sampler.samples[0][0], 2), round(mb, 1)) for t, mb in sampler.samples[::5]],
        "worker_log": log,
    }


def _hwm_mb(pid: int) -> float | None:
    from bench.harness import proc_status_kb

    kb = proc_status_kb(pid, "VmHWM")
    return kb / 1024 if kb else None


def slope_part(args: argparse.Namespace) -> dict[str, Any]:
    sim_args = ["--latency-ms", str(args.small_latency_ms), "--image-bytes", "0", "--seed", "1"]
    # all the jobs are submitted at once: no tenant limit on unfinished tasks (the default 10,000 refused
    # 67,109 of 100,000 with 429)
    env = {"TENANT_MAX_QUEUED": "0"}
    with bench_stack(sim_args=sim_args, env=env, keep=args.keep, snapshot=not args.live) as stack:
        say("p4", f"slope: stack up in {stack.root}")
        worker = stack.start_worker("p4-small", pool="threads", concurrency=args.small_concurrency)
        try:
            body = seed_body()
            with RssSampler(worker.pid, 0.5) as sampler:
                submitted = submit_jobs(stack.api_url, [body] * args.small_jobs, parallelism=16)
                _, final = wait_all_final(stack.api_url, submitted.ids, timeout=120 + args.small_jobs * 0.1)
            log = log_problems(stack.log_dir / "p4-small.log")
        finally:
            stack.stop_worker("p4-small")
    tasks = list(final.values()) or fetch_tasks(stack.api_url, submitted.ids)
    done_at = sorted(parse_time(t["finished_at"]) for t in tasks if t.get("finished_at"))
    points = []  # (jobs done, RSS MB)
    index = 0
    for when, mb in sampler.samples:
        while index < len(done_at) and done_at[index] <= when:
            index += 1
        points.append((index, mb))
    start = 0.2 * len(done_at)
    steady = [(x, y) for x, y in points if x >= start]
    slope = _slope(steady)
    first = steady[0][1] if steady else None
    return {
        "jobs": args.small_jobs,
        "concurrency": args.small_concurrency,
        "failures": len(submitted.errors) + sum(1 for t in tasks if t["status"] != "succeeded"),
        "rss_at_20pct_mb": first,
        "rss_end_mb": points[-1][1] if points else None,
        "rss_peak_mb": sampler.peak,
        "slope_kb_per_1000_jobs": slope * 1024 * 1000 if slope is not None else None,
        "points": points[::2],
        "worker_log": log,
    }


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (MB per job)."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def run(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in vars(args) if k not in ("no_write", "keep", "profile")}
    data = new_data("p4", params)
    data["peak"] = peak_part(args)
    say("p4", f"peak: {_peak_line(data['peak'])}")
    if args.small_jobs:
        data["slope"] = slope_part(args)
        s = data["slope"]
        say("p4", f"slope: {fmt(s['slope_kb_per_1000_jobs'], 0)} KB per 1000 jobs, failures {s['failures']}")
    finish(data, render, args)
    failures = data["peak"]["failures"] + data.get("slope", {}).get("failures", 0)
    return 0 if failures == 0 else 1


def _peak_line(p: dict[str, Any]) -> str:
    return (
        f"image {fmt(p['image_mb'])} MB, baseline {fmt(p['baseline_rss_mb'], 0)} MB, peak "
        f"{fmt(p['peak_rss_mb'], 0)} MB, per in-flight image {fmt(p['growth_per_image_mb'], 1)} MB = "
        f"{fmt(p['ratio'])}× its size, failures {p['failures']}"
    )


def render(data: dict[str, Any]) -> str:
    p = data["peak"]
    out = header(data, "P4: worker memory (`python -m bench p4`)")
    out += [
        f"Peak: {p['jobs']} jobs at C = {p['concurrency']}, 4K images of {fmt(p['image_mb'])} MB "
        f"({p['width_height']}), latency {data['params']['latency_ms']} ms "
        "(a wave's answers arrive together).",
        "",
        markdown_table(
            [
                "image MB",
                "in flight",
                "baseline RSS MB",
                "peak RSS MB",
                "growth MB",
                "per image MB",
                "ratio to image size",
                "target",
                "max in flight (sim)",
                "failures",
            ],
            [
                [
                    p["image_mb"],
                    p["concurrency"],
                    fmt(p["baseline_rss_mb"], 0),
                    fmt(p["peak_rss_mb"], 0),
                    fmt(p["growth_mb"], 0),
                    fmt(p["growth_per_image_mb"], 1),
                    p["ratio"],
                    f"≤ {p['target']}",
                    p["max_in_flight"],
                    p["failures"],
                ]
            ],
        ),  # fmt: skip
        "",
    ]
    if "slope" in data:
        s = data["slope"]
        out += [
            f"Slope: {s['jobs']} small jobs at C = {s['concurrency']}; "
            "RSS against jobs done after the first 20 %.",
            "",
            markdown_table(
                ["jobs", "RSS at 20 % MB", "RSS at end MB", "peak MB", "slope KB / 1000 jobs", "failures"],
                [
                    [
                        s["jobs"],
                        fmt(s["rss_at_20pct_mb"], 1),
                        fmt(s["rss_end_mb"], 1),
                        fmt(s["rss_peak_mb"], 1),
                        fmt(s["slope_kb_per_1000_jobs"], 0),
                        s["failures"],
                    ]
                ],
            ),  # fmt: skip
            "",
        ]
    return "\n".join(out)
