"""Lua scripts with named keys and arguments.

A ``Script`` names every key it touches and every argument it reads, in the order its source reads them
as ``KEYS[n]`` and ``ARGV[n]``, and is called with keyword arguments: no call site builds a positional
list, and a call that leaves a key out fails before anything is sent. A script that touches one key per
item of a list (a claim over candidates) names that tail too (``more_keys``, with ``more_args`` for the
items themselves). Every key a script touches is declared, as Redis Cluster requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError

from services.replication import ReplicaAck

# A Lua function for scripts that need now: Redis's own clock in epoch ms (``TIME``), the one every process
# shares, whatever its host's clock says (a worker host whose clock is off must not end others' leases or
# limiter slots early). Prepend it to a script's source.
REDIS_NOW_MS = """
local function redis_now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
"""


class Script:
    def __init__(
        self,
        client: redis.Redis,
        source: str,
        *,
        keys: Sequence[str],
        args: Sequence[str] = (),
        more_keys: str | None = None,
        more_args: str | None = None,
    ) -> None:
        self._client = client
        self._source = source
        self._script = client.register_script(source)
        self._keys = tuple(keys)
        self._args = tuple(args)
        self._more_keys = more_keys
        self._more_args = more_args

    def __call__(self, **values: Any) -> Any:
        keys, args = self._arguments(values)
        return self._script(keys=keys, args=args)

    def call_acknowledged(self, ack: ReplicaAck, **values: Any) -> tuple[Any, int]:
        """Run the script and WAIT for ``ack.replicas`` in one round trip (``services/replication.py``);
        return its result and how many replicas acknowledged. A server without the script (a new
        primary after a failover: scripts are not replicated) gets it first; nothing ran then."""
        keys, args = self._arguments(values)

        def commands(pipe: Pipeline) -> None:
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)

        try:
            result, acknowledged = ack.write(self._client, commands)
        except NoScriptError:
            self._client.script_load(self._source)
            result, acknowledged = ack.write(self._client, commands)
        return result, int(acknowledged)

    def _arguments(self, values: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        expected = {*self._keys, *self._args} | {name for name in (self._more_keys, self._more_args) if name}
        required = {*self._keys, *self._args}
        if not required <= values.keys() or not values.keys() <= expected:
            raise TypeError(
                f"script takes keys {self._keys} and arguments {self._args}"
                f" (and {self._more_keys}, {self._more_args}); given {sorted(values)}"
            )
        keys = [values[name] for name in self._keys] + list(values.get(self._more_keys or "", ()))
        args = [values[name] for name in self._args] + list(values.get(self._more_args or "", ()))
        return keys, args
