"""What the performance scenarios (P1–P5: ``bench/p1.py`` … ``bench/p5.py``) share on top of ``harness``.

- ``add_common_arguments``: ``--keep --live --no-write --quiet-wait --submit-parallelism --profile``;
  ``add_batch_arguments``: ``--submit --worker-env``, for the scenarios that measure batches through
  ``run_batch`` (p1a, p1b, p5, p6), with ``submitter`` (how ``--submit`` sends a batch's jobs) and
  ``worker_env`` (the ``--worker-env`` settings).
- ``new_data`` / ``finish``: the JSON document every scenario writes (command, machine, code version,
  parameters) and how it is written with its Markdown (``harness.write_results``).
- ``run_batch``: submit N jobs over HTTP while the given workers run, wait until every one is final, and
  return makespan, timings, the workers' CPU and memory, the other components' CPU, the machine's load
  and the simulator's counters (``max_in_flight``): one measured batch.
- ``profiled``: py-spy on the workers during a batch (``--profile``), with a short text summary of
  where the CPU went (``profile_summary``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.harness import (
    RESULTS_DIR,
    BenchStack,
    ProcessSampler,
    Submitted,
    code_fingerprint,
    code_info,
    cpu_usage,
    fetch_tasks,
    fmt,
    log_problems,
    machine_info,
    machine_usage,
    parse_time,
    submit_batches,
    submit_jobs,
    task_timings,
    wait_all_final,
    wait_for_quiet,
    write_results,
)


def add_common_arguments(parser: argparse.ArgumentParser, *, quiet_wait: float = 15) -> None:
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=quiet_wait,
        help=f"wait up to this many seconds for the machine to be quiet before measuring ({quiet_wait:g})",
    )
    parser.add_argument("--submit-parallelism", type=int, default=16, help="client threads that POST (16)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="p1a, p1b, p5: record the worker(s) with py-spy during the measured batch (collapsed stacks "
        "and a summary in bench/results/profiles/)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with every component's logs")
    parser.add_argument("--live", action="store_true", help="run the working tree, not a snapshot of it")
    parser.add_argument("--no-write", action="store_true", help="do not write into bench/results/")


def add_batch_arguments(parser: argparse.ArgumentParser, *, submit: str = "posts") -> None:
    parser.add_argument(
        "--submit",
        choices=("posts", "batches"),
        default=submit,
        help=f"how the measured jobs are sent: one POST each (posts), or POST /v1/batches of 1,000 "
        f"(batches: the client's and the API's CPU out of the workers' way) ({submit})",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the workers (repeatable), e.g. to compare a setting",
    )


def submitter(args: argparse.Namespace) -> Callable[[str, Sequence[Any]], Submitted]:
    """How ``--submit`` sends the measured jobs, for ``run_batch``."""
    if args.submit == "batches":
        return submit_batches
    return functools.partial(submit_jobs, parallelism=args.submit_parallelism)


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """The ``--worker-env NAME=VALUE`` settings."""
    return dict(item.split("=", 1) for item in args.worker_env)


def new_data(scenario: str, params: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "command": f"python -m bench {scenario} " + " ".join(sys.argv[2:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "code": code_info(),
        "params": dict(params),
        "_began": time.monotonic(),
    }


def finish(data: dict[str, Any], render: Callable[[dict[str, Any]], str], args: argparse.Namespace) -> None:
    """Render the Markdown, print it and write both files (unless ``--no-write``)."""
    data["elapsed_s"] = time.monotonic() - data.pop("_began")
    data["code"]["changed_during_run"] = code_fingerprint() != data["code"]["fingerprint"]
    markdown = render(data)
    print(markdown)
    if not args.no_write:
        path = write_results(data["scenario"], data, markdown)
        say(data["scenario"], f"wrote {path} and {path.with_suffix('.md')}")


def header(data: Mapping[str, Any], title: str, *, ran: str | None = None) -> list[str]:
    """The results' first lines; ``ran``: what code ran, where not a stack's (a snapshot, or --live)."""
    m, c = data["machine"], data["code"]
    changed = f", {len(c['uncommitted'])} uncommitted file(s) in the code dirs" if c["uncommitted"] else ""
    return [
        f"# {title}",
        "",
        f"- run: {data['started']}, `{data['command'].strip()}`, {data.get('elapsed_s', 0):.0f} s in all",
        f"- code: commit {c['commit']}{changed}; fingerprint {c['fingerprint']}; "
        + (ran or ("working tree (--live)" if data["params"].get("live") else "the stack ran a snapshot"))
        + (" — the working tree CHANGED during the run" if c.get("changed_during_run") else ""),
        f"- machine: {m['cpus_usable']} CPUs, {m['mem_gb']} GB, Python {m['python']}, load before "
        f"{m['loadavg_at_start']}; every component shares these CPUs",
        "",
    ]


def say(scenario: str, message: str) -> None:
    print(f"[bench {scenario}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# one measured batch
# --------------------------------------------------------------------------------------------------


def run_batch(
    stack: BenchStack,
    workers: Mapping[str, int],
    bodies: Sequence[Any],
    *,
    latency_s: float,
    ideal_s: float | None,
    quiet_wait: float,
    submit: Callable[[str, Sequence[Any]], Submitted],
    profile_to: Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Submit ``bodies`` while ``workers`` (name → pid) run, wait until all are final; measure.

    ``submit(api_url, bodies)``: how the bodies are sent (``submitter`` gives the one ``--submit`` asks
    for).

    The simulator's counters are reset first (so ``sim.max_in_flight`` is this batch's), and the machine
    is given up to ``quiet_wait`` seconds to go quiet. ``makespan_s`` = last ``finished_at`` − first
    ``created_at``; ``ratio`` = makespan / ``ideal_s``.
    """
    stack.sim_reset()
    result: dict[str, Any] = {"jobs": len(bodies), "ideal_s": ideal_s}
    result["busy_before"] = wait_for_quiet(max_wait=quiet_wait) if quiet_wait > 0 else None
    result["loadavg_before"] = list(os.getloadavg())
    others = {n: stack.children[n].pid for n in ("simulator", "s3", "api", "redis") if n in stack.children}
    timeout = timeout if timeout is not None else 120 + 6 * (ideal_s or latency_s * len(bodies))
    with ExitStack() as cm:
        machine = cm.enter_context(machine_usage())
        samplers = {name: cm.enter_context(ProcessSampler(pid)) for name, pid in workers.items()}
        other_cpu = cm.enter_context(cpu_usage(others))
        if profile_to is not None:
            cm.enter_context(profiled(workers, profile_to))
        submitted = submit(stack.api_url, bodies)
        try:
            seen_final, final = wait_all_final(stack.api_url, submitted.ids, timeout=timeout)
        except TimeoutError as exc:
            result["error"] = str(exc)
            seen_final, final = time.time(), {}
    sim = stack.sim_stats()
    tasks = [final[i] for i in submitted.ids] if final else fetch_tasks(stack.api_url, submitted.ids)
    timings = task_timings(tasks, latency_s=latency_s)
    worker_cpu = sum(s.cpu_s for s in samplers.values())
    makespan = timings["makespan_s"]
    result.update(
        {
            "makespan_s": makespan,
            "ratio": makespan / ideal_s if makespan and ideal_s else None,
            "submit_s": submitted.seconds,
            "submit_rate_per_s": len(bodies) / submitted.seconds if submitted.seconds else None,
            "submit_errors": submitted.errors[:10],
            "observed_s": seen_final - submitted.started,
            "timings": timings,
            "starts_per_half_second": start_histogram(tasks),
            "failures": timings["failures"] + len(submitted.errors),
            "workers": {name: s.as_dict() for name, s in samplers.items()},
            "worker_cpu_s": worker_cpu,
            "cpu_per_job_ms": 1000 * worker_cpu / max(1, len(bodies)),
            "peak_rss_mb": sum(s.peak_rss_mb for s in samplers.values()),
            "other_cpu_s": other_cpu,
            "machine": {
                **machine,
                "foreign_s": machine["busy_s"] - worker_cpu - sum(other_cpu.values()) - machine["self_s"],
            },
            "sim": {k: sim.get(k) for k in ("calls", "max_in_flight", "by_outcome")},
            "worker_logs": {name: log_problems(stack.log_dir / f"{name}.log") for name in workers},
        }
    )
    result["task_ids"] = submitted.ids
    result["_tasks"] = tasks  # for the caller; dropped before writing
    return result


def start_histogram(tasks: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """First attempts begun in each 0.5 s after the first submission (prompt refills show even waves)."""
    if not tasks:
        return {}
    first = min(parse_time(t["created_at"]) for t in tasks)
    counts: Counter[str] = Counter()
    for t in tasks:
        if t.get("started_at"):
            counts[f"{int((parse_time(t['started_at']) - first) * 2) / 2:.1f}"] += 1
    return dict(sorted(counts.items(), key=lambda item: float(item[0])))


def public(result: Mapping[str, Any]) -> dict[str, Any]:
    """A batch result without the bulky private fields (task records, ids)."""
    return {k: v for k, v in result.items() if not k.startswith("_") and k != "task_ids"}


def batch_line(r: Mapping[str, Any]) -> str:
    t = r["timings"]
    return (
        f"jobs={r['jobs']} makespan={fmt(r['makespan_s'])}s ideal={fmt(r['ideal_s'])}s "
        f"ratio={fmt(r['ratio'])} submit={fmt(r['submit_s'])}s overhead p50/p99="
        f"{fmt(t['overhead_p50_s'])}/{fmt(t['overhead_p99_s'])}s cpu={fmt(r['worker_cpu_s'])}s "
        f"({fmt(r['cpu_per_job_ms'], 1)} ms/job) rss={fmt(r['peak_rss_mb'], 0)}MB "
        f"in_flight={r['sim']['max_in_flight']} failures={r['failures']} "
        f"foreign={fmt(r['machine']['foreign_s'], 1)}s" + (f" ERROR {r['error']}" if r.get("error") else "")
    )


def bare_client_command(
    stack: BenchStack, body: Any, *, jobs: int, concurrency: int, options: Sequence[str] = ()
) -> list[str]:
    """``python -m bench.bare_client`` against ``stack``'s simulator and S3 server, sending ``body``
    (written to a file in the stack's directory) ``jobs`` times with ``concurrency`` in flight; ``options``
    are its other flags. Run it from ``ROOT``."""
    body_path = stack.root / "bare-body.json"
    body_path.write_text(json.dumps(body))
    return [
        sys.executable, "-m", "bench.bare_client", "--upstream", stack.simulator_url,
        "--s3", stack.env["S3_ENDPOINT_URL"], "--bucket", stack.env["S3_BUCKET"], "--body", str(body_path),
        "--jobs", str(jobs), "--concurrency", str(concurrency), *options,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# profiling
# --------------------------------------------------------------------------------------------------


def py_spy() -> str | None:
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


@contextmanager
def profiled(workers: Mapping[str, int], directory: Path, *, rate: int = 250) -> Iterator[None]:
    """py-spy ``record`` each worker (its threads, samples that hold the GIL only) while the block runs;
    writes ``<name>.collapsed`` (flamegraph input) and ``<name>.txt`` (``profile_summary``)."""
    exe = py_spy()
    if exe is None:
        say("profile", "py-spy not found (pip install py-spy): not profiling")
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, pid in workers.items():
        out = directory / f"{name}.collapsed"
        args = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--gil"]
        args += ["--nonblocking", "--output", str(out)]
        procs[name] = (subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out)
    try:
        yield
    finally:
        for name, (proc, out) in procs.items():
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if out.exists():
                (directory / f"{name}.txt").write_text(profile_summary(out))
                say("profile", f"{name}: {out} and {out.with_suffix('.txt')}")


def profile_summary(collapsed: Path, *, top: int = 40) -> str:
    """Inclusive and self sample counts per function from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1] if " (" in f else f for f in stack.split(";")]
        for frame in set(frames[1:]):  # the first frame is the thread
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} samples holding the GIL", "", "inclusive:"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def profile_dir(scenario: str, label: str) -> Path:
    return RESULTS_DIR / "profiles" / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}-{label}"
