"""A submission's 202 survives a failover: it is answered only once enough replicas hold the task.

Redis replicates asynchronously: a write acknowledged by the primary is on the replicas a moment later,
and a primary that dies in that moment takes it along; the replica that Sentinel promotes has never
seen it. With ``REDIS_MIN_REPLICAS_ACK`` = n > 0, the write that accepts a task (the create script, which
also writes its idempotency record) is followed on the same connection, in the same round trip, by
``WAIT n timeout``: Redis answers once n replicas have acknowledged everything this connection wrote,
or after ``REDIS_REPLICA_ACK_TIMEOUT`` with how many did. Fewer than n, and the API answers 503
``store_unavailable``: nothing is promised. The task may exist all the same (it was written on the
primary, and will run if the primary lives on); a client that sends the same request again with its
``Idempotency-Key`` gets that task, once it is on enough replicas (``replay``), and never a second one.

WAIT does not make Redis strongly consistent (a replica may still lose the write if it and the primary
die together, or if Sentinel promotes a replica that had not got it while another had), but with
n = 1 and the replicas in sync, the promoted replica is the one with the most data, and the task
acknowledged with 202 is on it. An attempt's closing write (what the upstream was paid for: its success,
failure or retry) waits the same way, and its worker sends it again, to the new primary after a failover,
until a replica holds it (``JobStore._write``): a paid answer is not lost with the primary. The workers'
other writes are not waited for: a change a failover loses makes its task go back a step (a task whose
start is lost is started again), never lost or stuck.

Its cost, measured on the same machine with and without it: bench/README.md, "Replicated submissions".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from services.errors import StoreUnavailable


@dataclass(frozen=True)
class ReplicaAck:
    """How many replicas must hold a write before it is acknowledged (0: none, no WAIT), and how long
    to wait for them."""

    replicas: int = 0
    timeout: float = 0.5

    def write(self, client: redis.Redis, commands: Callable[[Pipeline], object]) -> list[Any]:
        """Send what ``commands`` puts in a pipeline, then WAIT, in one round trip on one connection;
        return the commands' replies (an error reply raised). Callers check their replies, then
        ``require`` on the count: a refused write (a tenant's limit) needs no replica."""
        pipe = client.pipeline(transaction=False)
        commands(pipe)
        pipe.wait(self.replicas, max(1, round(self.timeout * 1000)))
        replies = pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return list(replies)

    def require(self, acknowledged: int) -> None:
        """Raise ``StoreUnavailable`` unless ``acknowledged`` replicas (WAIT's answer) are enough."""
        if acknowledged < self.replicas:
            raise StoreUnavailable(
                f"the task store could not confirm the write on {self.replicas} replica(s) in time "
                f"({acknowledged} did); retry with the same Idempotency-Key"
            )


NO_REPLICA_ACK = ReplicaAck()
