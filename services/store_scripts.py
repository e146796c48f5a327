"""The Lua scripts of the job store (``services/store.py``), each with what it reads and returns.

Every key a script touches is passed in KEYS (``services/lua.py`` names them at each call site).
"""

# KEYS[1]: the task, KEYS[2..]: every other key the change touches. ARGV[1]: the document expected
# there, ARGV[2]: the new one, ARGV[3]: JSON {"absent": [key index], "writes": [[command, key index,
# args...]]}, indexes into KEYS. Returns 1 when written, 0 when the task changed meanwhile, -1 when a key
# that must be absent exists.
COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local extra = cjson.decode(ARGV[3])
for _, index in ipairs(extra.absent) do
  if redis.call('EXISTS', KEYS[index]) == 1 then return -1 end
end
redis.call('SET', KEYS[1], ARGV[2])
for _, write in ipairs(extra.writes) do redis.call(write[1], KEYS[write[2]], unpack(write, 3)) end
return 1
"""

# Submitting one task. KEYS: see ``_create``'s names. ARGV: the new task's id, record and payload, now and
# its order in the tenant's ready set (ms), the tenant, the defaults of its limits, the admission window
# (0: none), the idempotency record to write with it ('' for none) and its TTL, the broker message ('' for
# none), the usage TTL, how long the tenant's task index keeps an entry (ms), its Cancel-After deadline
# (ms, '' for none). Refuses with {-1, 0}
# when the tenant has max_queued unfinished tasks, {-2, ms to wait} when its submission rate is used
# up; else writes everything and returns {1, admitted}: admitted
# (1) means the task went straight to the broker, because nothing of its tenant waits and the window
# and the tenant's max_concurrency have room (``services/admission.py`` applies the same rule to the
# tasks that wait); otherwise it waits in the tenant's ready set.
CREATE = """
local now = tonumber(ARGV[4])
local tenant = ARGV[6]
local own = redis.call('HGET', KEYS[10], tenant)
local settings = own and cjson.decode(own) or {}
local max_queued = tonumber(settings.max_queued or ARGV[7])
if max_queued > 0 and redis.call('SCARD', KEYS[4]) >= max_queued then return {-1, 0} end
local rate = tonumber(settings.rate_per_minute or ARGV[8])
if rate > 0 then
  local capacity = math.max(1, rate)
  local state = redis.call('HMGET', KEYS[11], 'tokens', 'at')
  local elapsed = now - tonumber(state[2] or now)
  local tokens = math.min(capacity, tonumber(state[1] or capacity) + elapsed * rate / 60000)
  if tokens < 1 then return {-2, math.ceil((1 - tokens) * 60000 / rate)} end
  redis.call('HSET', KEYS[11], 'tokens', tokens - 1, 'at', now)
  redis.call('PEXPIRE', KEYS[11], math.ceil(capacity * 60000 / rate) + 1000)
end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[18], 'queued')
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[15], now, ARGV[1])
redis.call('ZADD', KEYS[16], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[15], '-inf', '(' .. (now - tonumber(ARGV[15])))
if ARGV[16] ~= '' then redis.call('ZADD', KEYS[17], ARGV[16], ARGV[1]) end
redis.call('HINCRBY', KEYS[12], 'submitted', 1)
redis.call('EXPIRE', KEYS[12], ARGV[14])
if ARGV[11] ~= '' then redis.call('SET', KEYS[13], ARGV[11], 'EX', ARGV[12]) end
local window = tonumber(ARGV[10])
local max_concurrency = tonumber(settings.max_concurrency or ARGV[9])
if redis.call('ZCARD', KEYS[5]) == 0
  and (window == 0 or redis.call('ZCARD', KEYS[7]) < window)
  and (max_concurrency == 0 or redis.call('ZCARD', KEYS[8]) < max_concurrency) then
  redis.call('ZADD', KEYS[7], now, ARGV[1])
  redis.call('ZADD', KEYS[8], now, ARGV[1])
  redis.call('ZADD', KEYS[9], now, ARGV[1])
  if ARGV[13] ~= '' then redis.call('LPUSH', KEYS[14], ARGV[13]) end
  return {1, 1}
end
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
redis.call('SADD', KEYS[6], tenant)
return {1, 0}
"""

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

# KEYS[1]: a lease, KEYS[2]: the running set. ARGV: holder's token, time to live (ms), new deadline
# (epoch ms), task id. Returns 1 if the lease was still held (and is extended), else 0.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[4])
return 1
"""
