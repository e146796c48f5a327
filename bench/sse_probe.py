"""Follows tasks' event streams in a process of its own, and says when each one's ``succeeded`` arrived.

P3's "seen" figure is a client's: when its stream delivers the ``succeeded`` event. Followed by threads of
the bench's own process, that moment also held the wait for that process's GIL, shared with the webhook
receiver and the poller of every task: the more probes, the later every arrival was read, webhooks too.
Here one event loop in a separate process holds every stream (one connection each) and does nothing
else, so that what it measures is the service's path, not the observer's.

    python -m bench.sse_probe API_URL DEADLINE_EPOCH_S < ids.json > seen.json

``ids.json``: a JSON list of task ids, read at once; the streams are opened together. Output, once
every stream has ended or the deadline passed: ``{"seen": {id: epoch_s or null}, "errors": {id: text}}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


async def follow(client: httpx.AsyncClient, task_id: str, deadline: float) -> tuple[float | None, str | None]:
    """When the task's ``succeeded`` event arrived (None: never), and what went wrong if anything."""
    try:
        async with asyncio.timeout(max(1.0, deadline - time.time())):
            async with client.stream("GET", f"/v1/tasks/{task_id}/events") as response:
                async for line in response.aiter_lines():
                    if line == "event: succeeded":
                        return time.time(), None
        return None, "the stream ended without a succeeded event"
    except (httpx.HTTPError, TimeoutError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


async def follow_all(api_url: str, ids: list[str], deadline: float) -> dict[str, dict[str, object]]:
    limits = httpx.Limits(max_connections=len(ids) + 1, max_keepalive_connections=0)
    timeout = httpx.Timeout(10, read=None)
    async with httpx.AsyncClient(base_url=api_url, limits=limits, timeout=timeout) as client:
        outcomes = await asyncio.gather(*(follow(client, task_id, deadline) for task_id in ids))
    return {
        "seen": {task_id: seen for task_id, (seen, _) in zip(ids, outcomes, strict=True)},
        "errors": {task_id: error for task_id, (_, error) in zip(ids, outcomes, strict=True) if error},
    }


def main() -> None:
    api_url, deadline = sys.argv[1], float(sys.argv[2])
    ids = json.load(sys.stdin)
    json.dump(asyncio.run(follow_all(api_url, ids, deadline)), sys.stdout)


if __name__ == "__main__":
    main()
