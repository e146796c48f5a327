"""Every Redis key the service uses is built here, and nowhere else. This docstring is the data map.

``{p}`` is ``KEY_PREFIX`` (default ``iq``). Each key: its type, what it holds, who writes it, its TTL
("kept": no expiry while the task is not final). Every Lua script declares every key it touches in KEYS.

Tasks: written by ``services/store.py`` only, every change with one compare-and-set script
  {p}:task:{id}            string  the task's record (JSON, ``services.records.TaskRecord``)
                                   TTL: kept; 30 d once final
  {p}:payload:{id}         string  the upstream request body as submitted (can be megabytes)
                                   TTL: kept; 1 d once final
  {p}:result:{id}          string  an upstream answer paid for whose outputs are not stored yet; the
                                   retry uploads it (``JobRunner``). TTL: 1 d; deleted once final
  {p}:lease:{id}           string  the running attempt's lease token (``host:pid:thread:random``)
                                   TTL: the lease (PX), renewed by its holder; deleted when not running
  {p}:active               set     ids of the tasks that are not final
  {p}:queued               zset    admitted queued task id -> when its message was sent (ms), or when a
                                   worker holding it, waiting for its turn or a slot, last said so
  {p}:outbox               list    RabbitMQ broker only (``services/broker.py``): ids of admitted tasks
                                   whose message is not published yet, newest first; pushed by the
                                   create script and admission, removed once RabbitMQ confirmed the message
  {p}:delayed              zset    task id waiting for a retry -> when it is due (ms)
  {p}:running              zset    running task id -> its lease's deadline (ms), or, once the sweeper sent it
                                   again, a lease after a worker holding that message last said so
  {p}:deadlines            zset    task id -> its Cancel-After deadline (ms), until it is final
  {p}:events:{id}          list    the task's status changes, oldest first: entry i (from 1) is event i,
                                   its status (``GET /v1/tasks/{id}/events``); appended by the create
                                   and by every change of status. TTL: kept; 30 d once final, like the task

Tenants and admission (``services/tenants.py``, ``services/admission.py``); ``{t}`` is a tenant's name
  {p}:tenants              hash    tenant -> its own settings (JSON: max_concurrency, max_queued, ...)
  {p}:apikeys              hash    sha256 of an API key made by the admin API -> JSON {id, tenant, created_at}
  {p}:apikey_ids           hash    key id -> the sha256 it stands for (to revoke by id)
  {p}:t:{t}:active         set     the tenant's tasks that are not final (``max_queued``)
  {p}:t:{t}:tasks          zset    every task of the tenant -> its creation (ms): ``GET /v1/tasks``
  {p}:t:{t}:status:{s}     zset    the tenant's tasks in status {s} -> their creation (ms): its filter.
                                   Both trimmed as records expire (``services/task_list.py``)
  {p}:t:{t}:ready          zset    the tenant's queued tasks not yet admitted -> order (ms)
  {p}:t:{t}:admitted       zset    the tenant's admitted tasks (message sent, or running) -> since (ms)
  {p}:t:{t}:rate           hash    the tenant's submission token bucket: ``tokens``, ``at`` (ms)
  {p}:t:{t}:whsec          hash    webhook secrets: ``current``, ``previous``, ``previous_until`` (ms)
  {p}:t:{t}:usage:{day}    hash    the tenant's counts of one UTC day (submitted, succeeded, ...). TTL 400 d
  {p}:ready_tenants        set     tenants whose ready set is not empty (maybe: admission cleans it)
  {p}:admitted             zset    every admitted task -> since (ms); at most the window
  {p}:capacity             zset    ``host:pid=N`` of each worker process consuming generation jobs, N its
                                   concurrency × prefetch multiplier (the messages it reserves) -> until
                                   when it counts (ms): the window's bound. Renewed with its presence;
                                   removed when it stops (``services/presence.py``)

Batches (``services/batches.py``): written by the create that writes their tasks, counted by each change
  {p}:batch:{id}           hash    ``doc`` (JSON: id, tenant, created_at, metadata, webhook, task_ids),
                                   ``total``, a count per status, ``completed_at`` once every task is final,
                                   ``cancel_requested_at``. TTL: kept; 30 d once completed
  {p}:batch:{id}:tasks     zset    the batch's task ids -> their creation (ms): ``GET /v1/tasks?batch_id=``
                                   TTL: as the batch

Webhooks: the outbox (``services/webhooks/outbox.py``); events are written by the store with the change
  {p}:wh:event:{event id}  string  one event: its task (or its batch's id) as it was then (JSON).
                                   TTL: kept; TASK_RETENTION_DAYS once done
  {p}:wh:due               zset    pending event id -> when its next attempt is due (ms)
  {p}:wh:state:{event id}  hash    attempts, round_start, status, claim, next_at. TTL: as the event
  {p}:wh:log:{subject id} list    one JSON entry per delivery attempt of a task's (a batch's) events (the
                                   last 50). TTL: TASK_RETENTION_DAYS from its last entry

The upstream limiter (``services/limits.py``)
  {p}:limit:slots          zset    holder token -> when its slot expires unless renewed (ms)
  {p}:limit:cooldown       string  when every worker may call again after a 429 (ms). TTL: until then
  {p}:limit:bucket         hash    the token bucket: ``tokens``, ``at`` (ms)

Idempotency (``services/idempotency.py``)
  {p}:idem:{scope hash}:{key hash}
                           string  ``pending``, then ``done`` with the first response (JSON)
                                   TTL: 60 s pending, then IDEMPOTENCY_TTL

Cancels (``services/cancellation.py``): a pub/sub channel, not a key
  {p}:cancels              channel the id of each task canceled, for the worker running its call

Task events (``services/task_events.py``): a pub/sub channel, not a key; the store publishes with each
change of status
  {p}:task-events          channel the id of each task whose status changed, for the requests that wait

Workers (``services/presence.py``)
  {p}:worker:{host}:{pid}  string  a worker process that consumes: node name, queues (JSON)
                                   TTL: three heartbeats, renewed; deleted when it stops

The broker's keys are kombu's, not ours: the lists ``generation`` and ``webhooks`` (the queues),
``unacked`` and ``unacked_index`` (messages a worker holds), ``_kombu.binding.*``.
"""

from __future__ import annotations


class Keys:
    """The key names under one prefix."""

    def __init__(self, prefix: str = "iq") -> None:
        self.prefix = prefix

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # tasks ------------------------------------------------------------------------------------------
    def task(self, task_id: str) -> str:
        return self._key("task", task_id)

    def payload(self, task_id: str) -> str:
        return self._key("payload", task_id)

    def result(self, task_id: str) -> str:
        return self._key("result", task_id)

    def lease(self, task_id: str) -> str:
        return self._key("lease", task_id)

    def events(self, task_id: str) -> str:
        return self._key("events", task_id)

    @property
    def active(self) -> str:
        return self._key("active")

    @property
    def queued(self) -> str:
        return self._key("queued")

    @property
    def outbox(self) -> str:
        return self._key("outbox")

    @property
    def delayed(self) -> str:
        return self._key("delayed")

    @property
    def running(self) -> str:
        return self._key("running")

    @property
    def deadlines(self) -> str:
        return self._key("deadlines")

    # tenants and admission ------------------------------------------------------------------------
    @property
    def tenants(self) -> str:
        return self._key("tenants")

    @property
    def api_keys(self) -> str:
        return self._key("apikeys")

    @property
    def api_key_ids(self) -> str:
        return self._key("apikey_ids")

    def tenant_active(self, tenant: str) -> str:
        return self._key("t", tenant, "active")

    def tenant_tasks(self, tenant: str) -> str:
        return self._key("t", tenant, "tasks")

    def tenant_status(self, tenant: str, status: str) -> str:
        return self._key("t", tenant, "status", status)

    def tenant_ready(self, tenant: str) -> str:
        return self._key("t", tenant, "ready")

    def tenant_admitted(self, tenant: str) -> str:
        return self._key("t", tenant, "admitted")

    def batch(self, batch_id: str) -> str:
        return self._key("batch", batch_id)

    def batch_tasks(self, batch_id: str) -> str:
        return self._key("batch", batch_id, "tasks")

    def tenant_rate(self, tenant: str) -> str:
        return self._key("t", tenant, "rate")

    def tenant_webhook_secrets(self, tenant: str) -> str:
        return self._key("t", tenant, "whsec")

    def tenant_usage(self, tenant: str, day: str) -> str:
        return self._key("t", tenant, "usage", day)

    @property
    def ready_tenants(self) -> str:
        return self._key("ready_tenants")

    @property
    def admitted(self) -> str:
        return self._key("admitted")

    @property
    def capacity(self) -> str:
        return self._key("capacity")

    # webhooks ---------------------------------------------------------------------------------------
    def webhook_event(self, event_id: str) -> str:
        return self._key("wh", "event", event_id)

    def webhook_state(self, event_id: str) -> str:
        return self._key("wh", "state", event_id)

    def webhook_log(self, task_id: str) -> str:
        return self._key("wh", "log", task_id)

    @property
    def webhooks_due(self) -> str:
        return self._key("wh", "due")

    # the upstream limiter ---------------------------------------------------------------------------
    @property
    def limiter_slots(self) -> str:
        return self._key("limit", "slots")

    @property
    def limiter_cooldown(self) -> str:
        return self._key("limit", "cooldown")

    @property
    def limiter_bucket(self) -> str:
        return self._key("limit", "bucket")

    # idempotency ------------------------------------------------------------------------------------
    def idempotency(self, scope_hash: str, key_hash: str) -> str:
        return self._key("idem", scope_hash, key_hash)

    @property
    def cancels(self) -> str:
        return self._key("cancels")

    @property
    def task_events(self) -> str:
        return self._key("task-events")

    # workers ----------------------------------------------------------------------------------------
    def worker(self, name: str) -> str:
        return self._key("worker", name)

    def workers_pattern(self) -> str:
        return self._key("worker", "*")
