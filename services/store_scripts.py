"""The Lua scripts of the job store (``services/store.py``), each with what it reads and returns.

Every key a script touches is passed in KEYS (``services/lua.py`` names them at each call site).
"""

from services.admission import ADMISSION_WINDOW
from services.lua import REDIS_NOW_MS

# KEYS[1]: the task, KEYS[2..]: every other key the change touches. ARGV[1]: the document expected
# there, ARGV[2]: the new one, ARGV[3]: JSON {"absent": [key index], "not_members": absent, or [[key
# index of a sorted set, member]] (each must not be in its set), "writes": [[command, key index,
# args...]] (a command ``ZADD_AFTER_NOW`` with [key index, ms, member] scores the member ms after Redis's
# clock: a lease's deadline in the running set), "batch": absent, or the change of status of a task in
# a batch: {"key", "tasks", "event",
# "due": KEYS indexes of the batch's hash, its task index, its completion event and the outbox's due set;
# "from", "to": the statuses; "final": whether "to" is; "finished_at": the task's, when final;
# "event_id", "document": its completion event; "now_ms", "ttl"}}, indexes into KEYS. The batch's
# counts move with the change; the change that leaves none of its tasks unfinished completes it:
# ``completed_at`` (the latest ``finished_at`` of its tasks, whatever order their changes were written
# in), its retention, and its ``batch.completed`` event in the outbox when its webhook asked for one
# (its hash's ``notify``).
# Returns 1 when written, 0 when the task changed meanwhile, -1 when a key that must be absent exists
# (or a member that must not be in its set is).
COMPARE_AND_SET = (
    REDIS_NOW_MS
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local extra = cjson.decode(ARGV[3])
for _, index in ipairs(extra.absent) do
  if redis.call('EXISTS', KEYS[index]) == 1 then return -1 end
end
for _, pair in ipairs(extra.not_members or {}) do
  if redis.call('ZSCORE', KEYS[pair[1]], pair[2]) then return -1 end
end
redis.call('SET', KEYS[1], ARGV[2])
for _, write in ipairs(extra.writes) do
  if write[1] == 'ZADD_AFTER_NOW' then  -- [_, key, ms, member]: scored ms after Redis's own clock
    redis.call('ZADD', KEYS[write[2]], redis_now_ms() + tonumber(write[3]), write[4])
  else
    redis.call(write[1], KEYS[write[2]], unpack(write, 3))
  end
end
local batch = extra.batch
if batch and redis.call('EXISTS', KEYS[batch.key]) == 1 then
  local key = KEYS[batch.key]
  redis.call('HINCRBY', key, batch.from, -1)
  redis.call('HINCRBY', key, batch.to, 1)
  if batch.final then
    local counts = redis.call('HMGET', key, 'total', 'succeeded', 'failed', 'canceled', 'completed_at',
      'notify', 'last_finished_at')
    local last = counts[7]
    if not last or batch.finished_at > last then last = batch.finished_at end
    redis.call('HSET', key, 'last_finished_at', last)
    local final = tonumber(counts[2] or '0') + tonumber(counts[3] or '0') + tonumber(counts[4] or '0')
    if not counts[5] and final >= tonumber(counts[1]) then
      redis.call('HSET', key, 'completed_at', last)
      redis.call('EXPIRE', key, batch.ttl)
      redis.call('EXPIRE', KEYS[batch.tasks], batch.ttl)
      if counts[6] then
        redis.call('SET', KEYS[batch.event], batch.document, 'NX')
        redis.call('ZADD', KEYS[batch.due], 'NX', batch.now_ms, batch.event_id)
      end
    end
  end
end
return 1
"""
)

# Submitting tasks: one, or a batch's, all or none. KEYS: the keys named by ``_create`` (the last: the
# workers' capacity), then per task its record, payload and status events. ARGV: now (ms), the tenant,
# the defaults of its limits, the window setting (``admission.window_setting``), the idempotency record
# to write with them ('' for none) and its TTL, the usage TTL, how long the tenant's indexes keep an
# entry (ms), the batch's id ('' for none) and its hash's fields (JSON [field, value, ...]), the pending
# idempotency record the key must still hold, or nothing ('' for no check), then per
# task its id, record, payload, order in the tenant's ready set (ms), Cancel-After deadline (ms, '' for
# none) and broker message ('' for none).
# Refuses with {-3, 0} when the idempotency key holds another request's record (``services/idempotency.py``),
# {-1, 0} when the tenant's unfinished tasks would pass max_queued, {-2, ms to wait} when
# its submission rate is used up (a request, whatever it holds, takes one token); else writes
# everything and returns {1, how many went straight to the broker}. A task does when nothing of its
# tenant waits and the window and the tenant's max_concurrency have room (``services/admission.py``
# applies the same rule to the tasks that wait); otherwise it waits in the tenant's ready set.
CREATE = (
    ADMISSION_WINDOW
    + """
local FIXED_KEYS, FIXED_ARGS = 18, 13
local now = tonumber(ARGV[1])
local tenant = ARGV[2]
if ARGV[13] ~= '' then
  local held = redis.call('GET', KEYS[11])
  if held and held ~= ARGV[13] then return {-3, 0} end
end
local count = (#KEYS - FIXED_KEYS) / 3
local own = redis.call('HGET', KEYS[8], tenant)
local settings = own and cjson.decode(own) or {}
local max_queued = tonumber(settings.max_queued or ARGV[3])
if max_queued > 0 and redis.call('SCARD', KEYS[2]) + count > max_queued then return {-1, 0} end
local rate = tonumber(settings.rate_per_minute or ARGV[4])
if rate > 0 then
  local capacity = math.max(1, rate)
  local state = redis.call('HMGET', KEYS[9], 'tokens', 'at')
  local elapsed = now - tonumber(state[2] or now)
  local tokens = math.min(capacity, tonumber(state[1] or capacity) + elapsed * rate / 60000)
  if tokens < 1 then return {-2, math.ceil((1 - tokens) * 60000 / rate)} end
  redis.call('HSET', KEYS[9], 'tokens', tokens - 1, 'at', now)
  redis.call('PEXPIRE', KEYS[9], math.ceil(capacity * 60000 / rate) + 1000)
end
local window = admission_window(tonumber(ARGV[6]), KEYS[18], now)
local max_concurrency = tonumber(settings.max_concurrency or ARGV[5])
local batch = ARGV[11]
local sent = 0
for task = 0, count - 1 do
  local k, a = FIXED_KEYS + 3 * task, FIXED_ARGS + 6 * task
  local id = ARGV[a + 1]
  redis.call('SET', KEYS[k + 2], ARGV[a + 3])
  redis.call('SET', KEYS[k + 1], ARGV[a + 2])
  redis.call('RPUSH', KEYS[k + 3], 'queued')
  redis.call('SADD', KEYS[1], id)
  redis.call('SADD', KEYS[2], id)
  redis.call('ZADD', KEYS[13], now, id)
  redis.call('ZADD', KEYS[14], now, id)
  if ARGV[a + 5] ~= '' then redis.call('ZADD', KEYS[15], ARGV[a + 5], id) end
  if batch ~= '' then redis.call('ZADD', KEYS[17], now, id) end
  if redis.call('ZCARD', KEYS[3]) == 0
    and (window == nil or redis.call('ZCARD', KEYS[5]) < window)
    and (max_concurrency == 0 or redis.call('ZCARD', KEYS[6]) < max_concurrency) then
    redis.call('ZADD', KEYS[5], now, id)
    redis.call('ZADD', KEYS[6], now, id)
    redis.call('ZADD', KEYS[7], now, id)
    if ARGV[a + 6] ~= '' then redis.call('LPUSH', KEYS[12], ARGV[a + 6]) end
    sent = sent + 1
  else
    redis.call('ZADD', KEYS[3], ARGV[a + 4], id)
    redis.call('SADD', KEYS[4], tenant)
  end
end
local expired = '(' .. (now - tonumber(ARGV[10]))
redis.call('ZREMRANGEBYSCORE', KEYS[13], '-inf', expired)
redis.call('HINCRBY', KEYS[10], 'submitted', count)
redis.call('EXPIRE', KEYS[10], ARGV[9])
if ARGV[7] ~= '' then redis.call('SET', KEYS[11], ARGV[7], 'EX', ARGV[8]) end
if batch ~= '' then
  redis.call('HSET', KEYS[16], unpack(cjson.decode(ARGV[12])))
end
return {1, sent}
"""
)

# KEYS[1]: the delayed set, KEYS[2]: the set of tenants with ready tasks, KEYS[3..]: the ready set of
# each candidate's tenant. ARGV[1]: now (ms); then per candidate its id, tenant and order (ms). Moves each
# candidate still due from delayed to its tenant's ready set. Returns the ids moved.
CLAIM_DUE = """
local moved = {}
for index = 2, #ARGV, 3 do
  local member = ARGV[index]
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZADD', KEYS[2 + (index + 1) / 3], ARGV[index + 2], member)
    redis.call('SADD', KEYS[2], ARGV[index + 1])
    moved[#moved + 1] = member
  end
end
return moved
"""

# Deleting a final task. KEYS: the task, its payload, its saved answer, its webhook log, its tenant's
# index and status index, the webhook outbox's due set, its status events, then each of its possible
# webhook events' event and state keys. ARGV: the document expected, the task id, then its possible
# webhook event ids. Returns 0 when the document changed meanwhile, else 1.
DELETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[8])
redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('ZREM', KEYS[6], ARGV[2])
for index = 3, #ARGV do redis.call('ZREM', KEYS[7], ARGV[index]) end
for index = 9, #KEYS do redis.call('DEL', KEYS[index]) end
return 1
"""

# KEYS[1]: the sorted set to claim from, KEYS[2]: the one to move claimed members to (may be the same).
# ARGV: claim members scored at most ARGV[1], give them score ARGV[2], at most ARGV[3] of them.
CLAIM = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(members) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[2], ARGV[2], member)
end
return members
"""

# KEYS[1]: the running set, KEYS[2..]: the lease key of each candidate, ARGV[3..] the candidates (in
# the same order). ARGV[1]: now (ms), ARGV[2]: the score claimed members get (ms). A candidate is
# claimed if its deadline is still past and its lease key is gone. One whose key is still there is not:
# its score ran ahead of the key's expiry (the deadline is computed just before the renewal sets the
# key's TTL), so it moves to when the key expires; claimed, its next attempt would find the lease still
# held and drop the task for another whole lease.
CLAIM_EXPIRED = """
local now = tonumber(ARGV[1])
local claimed = {}
for index = 3, #ARGV do
  local member = ARGV[index]
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) <= now then
    local ttl = redis.call('PTTL', KEYS[index - 1])
    if ttl > 0 then
      redis.call('ZADD', KEYS[1], now + ttl, member)
    else
      redis.call('ZADD', KEYS[1], ARGV[2], member)
      claimed[#claimed + 1] = member
    end
  end
end
return claimed
"""

# KEYS[1]: the task, KEYS[2]: its saved answer. ARGV: the attempt's number, the answer, its TTL (s).
# Saves the answer only while that attempt is the task's open attempt. Returns 1 when saved, else 0.
SAVE_RESULT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local attempts = cjson.decode(raw)['attempts']
local last = attempts[#attempts]
if not last or last['number'] ~= tonumber(ARGV[1]) or last['finished_at'] ~= cjson.null then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: queued, running. ARGV: how long a hold lasts (ms), then task ids. A worker that holds these tasks'
# messages (waiting for its turn or an upstream slot) says so, so that the sweeper neither takes a message
# for lost nor sends another while it waits: each task still queued is scored now (Redis's clock;
# ``claim_lost_messages``), and each one in the running set (a task whose lease expired and which the
# sweeper sent again: this is that message) keeps its deadline at least a hold ahead
# (``claim_expired_leases``). Returns 1.
HOLD_MESSAGES = (
    REDIS_NOW_MS
    + """
local now = redis_now_ms()
local held_until = now + tonumber(ARGV[1])
for index = 2, #ARGV do
  local task_id = ARGV[index]
  redis.call('ZADD', KEYS[1], 'XX', now, task_id)
  local deadline = redis.call('ZSCORE', KEYS[2], task_id)
  if deadline and tonumber(deadline) < held_until then
    redis.call('ZADD', KEYS[2], held_until, task_id)
  end
end
return 1
"""
)

# KEYS[1]: the running set, then one lease per task. ARGV: per lease, its holder's token, its time to live
# (ms) and its task id. Returns, per lease, 1 if it was still held (and is extended), else 0: a worker
# renews all its leases in one call. The new deadline is on Redis's clock, never the worker's: a worker
# host whose clock is off can neither hide its task from the sweeper for as long as its clock is ahead nor
# have it taken over early (tests/test_partition.py).
RENEW_LEASES = (
    REDIS_NOW_MS
    + """
local now = redis_now_ms()
local renewed = {}
for i = 2, #KEYS do
  local token, ttl, task_id = ARGV[3 * i - 5], tonumber(ARGV[3 * i - 4]), ARGV[3 * i - 3]
  if redis.call('GET', KEYS[i]) == token then
    redis.call('PEXPIRE', KEYS[i], ttl)
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, task_id)
    renewed[i - 1] = 1
  else
    renewed[i - 1] = 0
  end
end
return renewed
"""
)
