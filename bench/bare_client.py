"""The P1b floor: a bare client that does a job's essential work in one process, with no queue.

N upstream calls, at most C in flight (asyncio + httpx), each answer parsed, its image base64-decoded
and checked (its sha256, sent as the upload's checksum, as the worker does) on the event loop, as a bare
client would, and uploaded with boto3 (``put_object`` in a thread pool
of C threads: boto3 is synchronous). Nothing is stored, retried, leased or validated. Run it as its own
process so that it has a GIL to itself, like a worker::

    python -m bench.bare_client --upstream URL --s3 URL --bucket B --jobs 400 --concurrency 100 \
        --body request.json

It prints one JSON object: ``makespan_s`` (first call sent → last upload done), per-job latencies and the
process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import functools
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import httpx


def _image_b64(answer: Any) -> str:
    for candidate in answer.get("candidates") or []:
        for part in (candidate.get("content") or {}).get("parts") or []:
            inline = part.get("inlineData") or part.get("inline_data")
            if isinstance(inline, dict) and not part.get("thought"):
                return inline["data"]
    for item in answer.get("data") or []:
        if item.get("b64_json"):
            return item["b64_json"]
    raise ValueError("no image in the answer")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = Path(args.body).read_bytes()
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=args.s3,
        region_name="us-east-1",
        aws_access_key_id=args.access_key,
        aws_secret_access_key=args.secret_key,
        config=botocore.config.Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            max_pool_connections=args.concurrency,
        ),
    )
    executor = ThreadPoolExecutor(args.concurrency, thread_name_prefix="upload")
    loop = asyncio.get_running_loop()
    timeout = httpx.Timeout(connect=10, read=300, write=300, pool=300)
    spans: list[tuple[float, float]] = []
    tails: list[float] = []  # per job: from the answer's last byte to the upload done
    errors: list[str] = []
    jobs = iter(range(args.warmup or args.jobs))

    def client(connections: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(base_url=args.upstream, limits=limits, timeout=timeout)

    # C slots, each taking the next job when its last is done. One client shared by all (the
    # straightforward way), or one per slot (--client-per-slot): httpcore's pool walks every connection
    # on each request and response, which a pool of thousands of connections pays quadratically.
    if args.client_per_slot:
        clients = [client(1) for _ in range(args.concurrency)]
    else:
        clients = [client(args.concurrency)] * args.concurrency

    async def slot(http: httpx.AsyncClient) -> None:
        for index in jobs:
            began = time.time()
            try:
                response = await http.post(
                    "/v1/images/generations", content=body, headers={"Content-Type": "application/json"}
                )
                response.raise_for_status()
                answered = time.time()  # its last byte is in
                data = binascii.a2b_base64(_image_b64(json.loads(response.content)), strict_mode=True)
                checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()  # the check
                del response
                key = f"{args.prefix}/{index}.png"
                upload = functools.partial(
                    s3.put_object,
                    Bucket=args.bucket,
                    Key=key,
                    Body=data,
                    ContentType="image/png",
                    ChecksumSHA256=checksum,
                )
                await loop.run_in_executor(executor, upload)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            spans.append((began, time.time()))
            tails.append(spans[-1][1] - answered)

    if args.warmup:  # threads, connections and pools made on first use, as a worker's warm-up
        await asyncio.gather(*(slot(http) for http in clients[: args.warmup]))
        spans.clear()
        tails.clear()
        jobs = iter(range(args.jobs))
    cpu0 = time.process_time()
    started = time.time()
    await asyncio.gather(*(slot(http) for http in clients))
    finished = time.time()
    cpu = time.process_time() - cpu0
    for http in set(clients):
        await http.aclose()
    executor.shutdown()
    return {
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "done": len(spans),
        "errors": errors[:10],
        "error_count": len(errors),
        "started": started,
        "finished": finished,
        "makespan_s": (max(e for _, e in spans) - min(b for b, _ in spans)) if spans else None,
        "cpu_s": cpu,
        "job_seconds": sorted(e - b for b, e in spans),
        "tail_seconds": sorted(tails),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_client", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the simulator's base URL")
    parser.add_argument("--s3", required=True, help="the S3 endpoint URL")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--access-key", default="bench")
    parser.add_argument("--secret-key", default="bench")
    parser.add_argument("--prefix", default="bare")
    parser.add_argument("--body", required=True, help="file with the request body to send")
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--client-per-slot", action="store_true", help="an httpx client per slot, not one")
    parser.add_argument("--warmup", type=int, default=0, help="jobs run first and not measured (0)")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    print()
    return 0 if not result["error_count"] else 1


if __name__ == "__main__":
    sys.exit(main())
