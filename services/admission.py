"""Admission: the store, not the broker's FIFO, decides which queued task goes to the workers next.

A new task goes straight to the broker when nothing of its tenant is waiting and there is room
(``JobStore.create``'s script). Otherwise it waits in its tenant's ready set (``{p}:t:{t}:ready``, in
submission order), and ``Admission.admit`` hands waiting tasks to the broker as room appears:

- the window: at most as many tasks admitted at once (``{p}:admitted``: sent to the broker or running)
  as the workers consuming now can take (``{p}:capacity``: each worker process announces its
  concurrency times its prefetch multiplier, ``services/presence.py``), and at most
  ``UPSTREAM_MAX_CONCURRENCY`` when that is set. So
  the broker never holds a backlog of its own: every task that cannot start now waits here, where
  priority, fair share and ``queue_position`` apply, and a burst from one tenant cannot bury the others'
  tasks behind it;
- each tenant: at most its ``max_concurrency`` admitted (``{p}:t:{t}:admitted``);
- fair share: each free place goes to the tenant with the fewest admitted tasks per unit of ``weight``
  (ties: the oldest waiting task), so free upstream slots are shared in proportion to the weights, not
  in arrival order;
- priority orders within a tenant (``ready_order``): ``high`` before every ``normal`` task, ``low``
  after ``normal`` tasks for at most ``LOW_PRIORITY_AGING``.

A task leaves the admitted sets in the store's own change that makes it final or puts it off for a retry
(``JobStore._consequences``); a due retry waits in its tenant's ready set again, in its first order.
Admission runs where places free up: after every job a worker runs (``JobRunner``), and on every sweep
(``services/sweeper.py``), which also covers a worker that died. Any number of processes may run it at
once: the pick is one script. A task picked but whose message was never pushed (its process died between
the two steps) is in ``{p}:queued`` like any admitted task, and the sweeper's lost-message check sends it.

The global limiter (``services/limits.py``) still guards the cap itself: admission orders the work,
the limiter is the hard bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import redis

from services.keys import Keys
from services.lua import REDIS_NOW_MS, Script
from services.redis_errors import mapped_redis_errors
from services.tenants import TenantSettings

# A Lua function for the scripts that admit (here and ``store_scripts.CREATE``): how many tasks may be
# admitted at once, given the window setting (``window_setting``: 0 none, > 0 a cap, < 0 no cap of its
# own), the capacity set and now (ms); nil for no limit.
ADMISSION_WINDOW = """
local function admission_window(window, capacity, now)
  if window == 0 then return nil end
  local slots = 0
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', capacity, now, '+inf')) do
    slots = slots + tonumber(string.match(member, '=(%d+)$') or '0')
  end
  if window > 0 and window < slots then return window end
  return slots
end
"""

# KEYS: admitted, queued, ready_tenants, tenants, capacity; then per tenant its ready and its admitted
# set. ARGV: the window setting, the defaults of max_concurrency and weight, the most to admit in this
# call; then the tenants' names (in the order of their keys). Returns the admitted task ids. Now is Redis's
# clock (the capacity set's, and the lost-message check's: ``JobStore.claim_lost_messages``).
_ADMIT = (
    REDIS_NOW_MS
    + ADMISSION_WINDOW
    + """
local now = redis_now_ms()
local room = tonumber(ARGV[4])
local window = admission_window(tonumber(ARGV[1]), KEYS[5], now)
if window ~= nil then room = math.min(room, window - redis.call('ZCARD', KEYS[1])) end
local tenants = {}
for index = 5, #ARGV do
  local ready = KEYS[6 + (index - 5) * 2]
  local admitted = KEYS[7 + (index - 5) * 2]
  local own = redis.call('HGET', KEYS[4], ARGV[index])
  local settings = own and cjson.decode(own) or {}
  if redis.call('ZCARD', ready) == 0 then
    redis.call('SREM', KEYS[3], ARGV[index])
  else
    tenants[#tenants + 1] = {
      name = ARGV[index], ready = ready, admitted = admitted,
      count = redis.call('ZCARD', admitted),
      max = tonumber(settings.max_concurrency or ARGV[2]),
      weight = tonumber(settings.weight or ARGV[3]),
    }
  end
end
local picked = {}
while room > 0 do
  local best, best_share, best_order = nil, 0, 0
  for _, tenant in ipairs(tenants) do
    if tenant.max == 0 or tenant.count < tenant.max then
      local head = redis.call('ZRANGE', tenant.ready, 0, 0, 'WITHSCORES')
      if #head > 0 then
        local share = (tenant.count + 1) / tenant.weight
        local order = tonumber(head[2])
        if best == nil or share < best_share or (share == best_share and order < best_order) then
          best, best_share, best_order = tenant, share, order
        end
      end
    end
  end
  if best == nil then break end
  local id = redis.call('ZPOPMIN', best.ready)[1]
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('ZADD', best.admitted, now, id)
  redis.call('ZADD', KEYS[2], now, id)
  best.count = best.count + 1
  picked[#picked + 1] = id
  room = room - 1
end
for _, tenant in ipairs(tenants) do
  if redis.call('ZCARD', tenant.ready) == 0 then redis.call('SREM', KEYS[3], tenant.name) end
end
return picked
"""
)

BATCH = 500  # the most admitted by one call; a full batch is followed by another at once
WORKERS_CAPACITY = -1  # the window setting without a cap of its own: the workers' capacity only


def window_setting(upstream_max_concurrency: int) -> int:
    """The window the scripts apply (``ADMISSION_WINDOW``) for ``UPSTREAM_MAX_CONCURRENCY`` (0: no cap):
    bounded by the consuming workers' capacity either way. (0 itself, no window at all, is for tests of
    the store alone, which have no workers.)"""
    return upstream_max_concurrency or WORKERS_CAPACITY


# A task's place in its tenant's ready set (ms): its creation, moved by its priority. ``high`` comes
# before every ``normal`` task still waiting (ten years ahead); ``low`` waits behind the ``normal`` tasks
# created up to LOW_PRIORITY_AGING after it, and no longer: it ages into the queue, never starves.
LOW_PRIORITY_AGING = 600.0
_PRIORITY_SHIFT_MS = {"high": -10 * 365 * 86400 * 1000, "normal": 0, "low": round(LOW_PRIORITY_AGING * 1000)}


def ready_order(created_ms: int, priority: str) -> int:
    """Where a waiting task goes in its tenant's ready set: lower goes first."""
    return created_ms + _PRIORITY_SHIFT_MS.get(priority, 0)


class Admission:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        send: Callable[[Sequence[str]], None],
        *,
        window: int,
        defaults: TenantSettings,
    ) -> None:
        """``send``: enqueues the admitted tasks (``services.queue.enqueue_generations``)."""
        self._redis = client
        self._keys = keys
        self._send = send
        self._window = window
        self._defaults = defaults
        self._admit = Script(
            client,
            _ADMIT,
            keys=["admitted", "queued", "ready_tenants", "tenants", "capacity"],
            args=["window", "max_concurrency", "weight", "limit"],
            more_keys="tenant_keys",
            more_args="tenant_names",
        )

    def admit(self) -> list[str]:
        """Send waiting tasks to the broker while there is room, fairly; return their ids.

        One round trip when no tenant waits; else three: the waiting tenants, the pick, the messages.
        """
        keys = self._keys
        with mapped_redis_errors():
            members = cast("set[bytes]", self._redis.smembers(keys.ready_tenants))
            if not members:
                return []
            names = sorted(member.decode() for member in members)
            tenant_keys: list[str] = []
            for name in names:
                tenant_keys += [keys.tenant_ready(name), keys.tenant_admitted(name)]
            picked = self._admit(
                admitted=keys.admitted,
                queued=keys.queued,
                ready_tenants=keys.ready_tenants,
                tenants=keys.tenants,
                capacity=keys.capacity,
                tenant_keys=tenant_keys,
                window=self._window,
                max_concurrency=self._defaults.max_concurrency,
                weight=self._defaults.weight,
                limit=BATCH,
                tenant_names=names,
            )
        task_ids = [member.decode() for member in picked]
        self._send(task_ids)
        return task_ids
