"""Configuration: read from the environment once, into a frozen value.

Every variable is documented in README.md and .env.example. An invalid value raises ``ConfigError``
naming the variable, so a process stops at start-up instead of failing on the first job.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.errors import ConfigError, ServiceError
from services.tenants import check_tenant_name

T = TypeVar("T")


# Seconds to wait before each delivery attempt of a webhook: the Standard Webhooks schedule (immediately,
# 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h: ten attempts over about three days).
DEFAULT_WEBHOOK_RETRY_SCHEDULE: tuple[float, ...] = (
    0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0,
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis behind Sentinel (services/redis_connection.py): the sentinels' addresses and the primary's name;
    # REDIS_URL then gives only the scheme (rediss: TLS), the credentials and the database number
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = field(default=None, repr=False)
    # a submission's 202 waits until this many replicas hold it (WAIT; services/replication.py); 0: off
    redis_min_replicas_ack: int = 0
    redis_replica_ack_timeout: float = 0.5
    key_prefix: str = "iq"
    # the Celery broker (services/broker.py): None is the store's Redis, as it always was; an amqp:// or
    # amqps:// URL is RabbitMQ, with quorum queues, publisher confirms and a dead-letter queue
    broker_url: str | None = field(default=None, repr=False)
    broker_delivery_limit: int = 5

    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "imagegen-outputs"
    s3_region: str = "us-east-1"
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    s3_presign_expires: int = 3600

    upstream_base_url: str = "http://127.0.0.1:8100"
    upstream_api_key: str | None = None
    upstream_timeout: float = 300.0
    upstream_connect_timeout: float = 10.0

    max_attempts: int = 5
    retry_base_delay: float = 1.0
    retry_max_delay: float = 60.0

    worker_concurrency: int = 50
    worker_pool: str = "threads"
    worker_prefetch_multiplier: int = 1
    worker_busy_threads: int = 32
    visibility_timeout: int = 3600
    task_lease_seconds: float = 30.0
    worker_shutdown_timeout: float = 330.0
    sweep_interval: float = 0.2
    worker_metrics_port: int = 0  # each worker process's own /metrics (services/metrics.py); 0: none

    upstream_max_concurrency: int = 0
    upstream_rate_per_minute: float = 0.0
    limiter_max_wait: float = 60.0
    upstream_hold_seconds: float = 86400.0
    upstream_quota_retry_seconds: float = 900.0
    upstream_max_retry_delay: float = 300.0
    max_upstream_response_bytes: int = 256 * 1024 * 1024

    # image URLs in an upstream answer on another origin than the upstream's (services/upstream_client.py)
    max_output_image_bytes: int = 64 * 1024 * 1024
    image_download_timeout: float = 60.0
    image_url_allow_private: bool = False
    image_url_allow_http: bool = False

    # tenants (services/tenants.py): API_KEYS is "tenant:key" pairs; a bare key is the tenant "default"
    api_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    allow_open_api: bool = True
    tenant_max_concurrency: int = 0
    tenant_max_queued: int = 10000
    tenant_rate_per_minute: float = 0.0
    tenant_weight: float = 1.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_input_images: int = 14
    max_inline_image_bytes: int = 7 * 1024 * 1024
    allowed_models: frozenset[str] | None = None
    store_timeout: float = 2.0
    idempotency_ttl: int = 86400
    task_retention_days: int = 30
    output_retention_days: int = 0  # 0: as long as the task (task_retention_days)

    # webhooks (services/webhooks.py); the secret is never shown in a repr
    webhook_signing_secret: str | None = field(default=None, repr=False)
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY_SCHEDULE
    webhook_timeout: float = 15.0
    webhook_lease_seconds: float = 60.0
    webhook_dispatch_interval: float = 0.05
    webhook_allow_private: bool = False
    webhook_allow_http: bool = False
    webhook_secret_grace: float = 86400.0
    public_base_url: str = "http://127.0.0.1:8000"
    # GET /v1/tasks/{id}/events (services/task_events.py): a comment this often keeps an idle stream open
    events_heartbeat: float = 15.0

    # logs (services/logs.py): "text", or "json" (one object a line)
    log_format: str = "text"

    @property
    def output_retention(self) -> int:
        """Days an output object is kept (``OUTPUT_RETENTION_DAYS``, else as long as its task)."""
        return self.output_retention_days or self.task_retention_days

    @property
    def rabbitmq(self) -> bool:
        """Whether the broker is RabbitMQ (``BROKER_URL=amqp://…``) rather than the store's Redis."""
        return self.broker_url is not None and self.broker_url.startswith(("amqp://", "amqps://"))

    @property
    def rabbitmq_tls(self) -> bool:
        """Whether RabbitMQ is reached over TLS (``BROKER_URL=amqps://…``)."""
        return self.broker_url is not None and self.broker_url.startswith("amqps://")

    @property
    def auth_required(self) -> bool:
        """Keys are required once any exist: from API_KEYS, or made through the admin API."""
        return bool(self.api_keys) or self.admin_api_key is not None


def _str(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


def _url(value: str) -> str:
    value = value.strip().rstrip("/")
    if not value.startswith(("http://", "https://")) or len(value) < 10:
        raise ValueError("must be an http:// or https:// URL")
    return value


def _redis_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return value


def _broker_url(value: str) -> str:
    value = value.strip()
    if not value.startswith(("amqp://", "amqps://", "redis://", "rediss://")):
        raise ValueError(
            "must be an amqp:// or amqps:// URL (RabbitMQ), or a redis:// URL equal to REDIS_URL, or unset "
            "(the broker is then the store's Redis)"
        )
    return value


def _sentinels(value: str) -> tuple[tuple[str, int], ...]:
    """``host:port`` pairs, comma-separated (``[v6 address]:port`` too)."""
    requirement = "must be comma-separated host:port pairs, e.g. 10.0.0.1:26379,10.0.0.2:26379"
    addresses: list[tuple[str, int]] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.strip().removeprefix("[").removesuffix("]")
        if not sep or not host or any(char.isspace() or char in "/@[]" for char in host):
            raise ValueError(requirement)
        addresses.append((host, _number(int, port, lambda number: 0 < number <= 65535, requirement)))
    if not addresses:
        raise ValueError(requirement)
    return tuple(addresses)


def _number(convert: Callable[[str], T], value: str, valid: Callable[[T], bool], requirement: str) -> T:
    """``convert(value)`` if it parses and is ``valid``; else ``ValueError(requirement)``, which, unlike
    int()'s and float()'s own messages, never repeats the value (it may be a secret put in the wrong
    variable)."""
    try:
        number = convert(value)
    except ValueError:
        raise ValueError(requirement) from None
    if not valid(number):
        raise ValueError(requirement)
    return number


def _positive_int(value: str) -> int:
    return _number(int, value, lambda number: number > 0, "must be a positive integer")


def _non_negative_int(value: str) -> int:
    return _number(int, value, lambda number: number >= 0, "must be zero or a positive integer")


def _positive_float(value: str) -> float:
    return _number(float, value, lambda number: 0 < number < math.inf, "must be a positive number")


def _non_negative_float(value: str) -> float:
    return _number(float, value, lambda number: 0 <= number < math.inf, "must be zero or a positive number")


def _port(value: str) -> int:
    return _number(int, value, lambda number: 0 <= number <= 65535, "must be a port number, 0 to 65535")


def _pool(value: str) -> str:
    # gevent is not offered: it needs `-P gevent` on the command line to patch sockets (a worker given
    # it by configuration alone hangs), and it measured slower than threads here (bench/README.md,
    # scenario pool).
    if value not in ("threads", "prefork", "solo"):
        raise ValueError("must be one of threads, prefork, solo")
    return value


def _log_format(value: str) -> str:
    if value.strip().lower() not in ("text", "json"):
        raise ValueError("must be text or json")
    return value.strip().lower()


def _csv_set(value: str) -> frozenset[str]:
    return frozenset(item.strip() for item in value.split(",") if item.strip())


def _tenant_keys(value: str) -> tuple[tuple[str, str], ...]:
    """``tenant:key`` pairs, comma-separated; a bare key belongs to the tenant ``default``."""
    pairs: list[tuple[str, str]] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        if not sep:
            tenant, key = "default", item
        tenant, key = tenant.strip(), key.strip()
        if not key:
            raise ValueError("each entry must be tenant:key or key, with a non-empty key")
        try:
            check_tenant_name(tenant)
        except ServiceError as exc:
            raise ValueError(exc.message) from None
        pairs.append((tenant, key))
    return tuple(pairs)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _webhook_secret(value: str) -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 to 64 random bytes."""
    value = value.strip()
    if not value.startswith("whsec_"):
        raise ValueError("must start with whsec_ (whsec_ + base64 of 24 to 64 random bytes)")
    try:
        key = base64.b64decode(value[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_ + valid base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"must hold 24 to 64 bytes after whsec_, not {len(key)}")
    return value


def _schedule(value: str) -> tuple[float, ...]:
    requirement = "must be comma-separated seconds, each zero or more"
    delays = tuple(
        _number(float, item, lambda delay: 0 <= delay < math.inf, requirement) for item in value.split(",")
    )
    if delays[0] != 0:
        raise ValueError("must start with 0: the first attempt is made at once")
    return delays


# variable name -> (field, parser)
_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "REDIS_URL": ("redis_url", _redis_url),
    "REDIS_SENTINELS": ("redis_sentinels", _sentinels),
    "REDIS_SENTINEL_MASTER": ("redis_sentinel_master", _str),
    "REDIS_SENTINEL_PASSWORD": ("redis_sentinel_password", _str),
    "REDIS_MIN_REPLICAS_ACK": ("redis_min_replicas_ack", _non_negative_int),
    "REDIS_REPLICA_ACK_TIMEOUT": ("redis_replica_ack_timeout", _positive_float),
    "KEY_PREFIX": ("key_prefix", _str),
    "BROKER_URL": ("broker_url", _broker_url),
    "BROKER_DELIVERY_LIMIT": ("broker_delivery_limit", _non_negative_int),
    "S3_ENDPOINT_URL": ("s3_endpoint_url", _url),
    "S3_PUBLIC_ENDPOINT_URL": ("s3_public_endpoint_url", _url),
    "S3_BUCKET": ("s3_bucket", _str),
    "S3_REGION": ("s3_region", _str),
    "AWS_ACCESS_KEY_ID": ("aws_access_key_id", _str),
    "AWS_SECRET_ACCESS_KEY": ("aws_secret_access_key", _str),
    "S3_PRESIGN_EXPIRES": ("s3_presign_expires", _positive_int),
    "UPSTREAM_BASE_URL": ("upstream_base_url", _url),
    "UPSTREAM_API_KEY": ("upstream_api_key", _str),
    "UPSTREAM_TIMEOUT": ("upstream_timeout", _positive_float),
    "UPSTREAM_CONNECT_TIMEOUT": ("upstream_connect_timeout", _positive_float),
    "MAX_ATTEMPTS": ("max_attempts", _positive_int),
    "RETRY_BASE_DELAY": ("retry_base_delay", _non_negative_float),
    "RETRY_MAX_DELAY": ("retry_max_delay", _non_negative_float),
    "WORKER_CONCURRENCY": ("worker_concurrency", _positive_int),
    "WORKER_POOL": ("worker_pool", _pool),
    "WORKER_PREFETCH_MULTIPLIER": ("worker_prefetch_multiplier", _positive_int),
    "WORKER_BUSY_THREADS": ("worker_busy_threads", _positive_int),
    "VISIBILITY_TIMEOUT": ("visibility_timeout", _positive_int),
    "TASK_LEASE_SECONDS": ("task_lease_seconds", _positive_float),
    "WORKER_SHUTDOWN_TIMEOUT": ("worker_shutdown_timeout", _positive_float),
    "SWEEP_INTERVAL": ("sweep_interval", _positive_float),
    "WORKER_METRICS_PORT": ("worker_metrics_port", _port),
    "UPSTREAM_MAX_CONCURRENCY": ("upstream_max_concurrency", _non_negative_int),
    "UPSTREAM_RATE_PER_MINUTE": ("upstream_rate_per_minute", _non_negative_float),
    "LIMITER_MAX_WAIT": ("limiter_max_wait", _non_negative_float),
    "UPSTREAM_HOLD_SECONDS": ("upstream_hold_seconds", _positive_float),
    "UPSTREAM_QUOTA_RETRY_SECONDS": ("upstream_quota_retry_seconds", _positive_float),
    "UPSTREAM_MAX_RETRY_DELAY": ("upstream_max_retry_delay", _positive_float),
    "MAX_UPSTREAM_RESPONSE_BYTES": ("max_upstream_response_bytes", _positive_int),
    "MAX_OUTPUT_IMAGE_BYTES": ("max_output_image_bytes", _positive_int),
    "IMAGE_DOWNLOAD_TIMEOUT": ("image_download_timeout", _positive_float),
    "IMAGE_URL_ALLOW_PRIVATE": ("image_url_allow_private", _bool),
    "IMAGE_URL_ALLOW_HTTP": ("image_url_allow_http", _bool),
    "API_KEYS": ("api_keys", _tenant_keys),
    "ADMIN_API_KEY": ("admin_api_key", _str),
    "ALLOW_OPEN_API": ("allow_open_api", _bool),
    "TENANT_MAX_CONCURRENCY": ("tenant_max_concurrency", _non_negative_int),
    "TENANT_MAX_QUEUED": ("tenant_max_queued", _non_negative_int),
    "TENANT_RATE_PER_MINUTE": ("tenant_rate_per_minute", _non_negative_float),
    "TENANT_WEIGHT": ("tenant_weight", _positive_float),
    "MAX_BODY_BYTES": ("max_body_bytes", _positive_int),
    "MAX_INPUT_IMAGES": ("max_input_images", _positive_int),
    "MAX_INLINE_IMAGE_BYTES": ("max_inline_image_bytes", _positive_int),
    "ALLOWED_MODELS": ("allowed_models", _csv_set),
    "STORE_TIMEOUT": ("store_timeout", _positive_float),
    "IDEMPOTENCY_TTL": ("idempotency_ttl", _positive_int),
    "TASK_RETENTION_DAYS": ("task_retention_days", _positive_int),
    "OUTPUT_RETENTION_DAYS": ("output_retention_days", _non_negative_int),
    "WEBHOOK_SIGNING_SECRET": ("webhook_signing_secret", _webhook_secret),
    "WEBHOOK_RETRY_SCHEDULE": ("webhook_retry_schedule", _schedule),
    "WEBHOOK_TIMEOUT": ("webhook_timeout", _positive_float),
    "WEBHOOK_LEASE_SECONDS": ("webhook_lease_seconds", _positive_float),
    "WEBHOOK_DISPATCH_INTERVAL": ("webhook_dispatch_interval", _positive_float),
    "WEBHOOK_ALLOW_PRIVATE": ("webhook_allow_private", _bool),
    "WEBHOOK_ALLOW_HTTP": ("webhook_allow_http", _bool),
    "WEBHOOK_SECRET_GRACE_SECONDS": ("webhook_secret_grace", _non_negative_float),
    "PUBLIC_BASE_URL": ("public_base_url", _url),
    "EVENTS_HEARTBEAT_SECONDS": ("events_heartbeat", _positive_float),
    "LOG_FORMAT": ("log_format", _log_format),
}

VARIABLES: tuple[str, ...] = tuple(_VARIABLES)


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from ``env`` (default: the process environment).

    Unset or empty variables keep their defaults; any other value must parse, or ``ConfigError``
    names the variable and says what it must be.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, (field_name, parse) in _VARIABLES.items():
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[field_name] = parse(raw)
        except ValueError as exc:
            # the name and what the value must be, never the value: it may be a secret
            raise ConfigError(f"{name} is invalid: {exc}") from None
    config = Config(**values)
    _check(config)
    return config


def _check(config: Config) -> None:
    if bool(config.redis_sentinels) != bool(config.redis_sentinel_master):
        raise ConfigError("REDIS_SENTINELS and REDIS_SENTINEL_MASTER must be set together, or neither")
    if config.redis_sentinel_password is not None and not config.redis_sentinels:
        raise ConfigError("REDIS_SENTINEL_PASSWORD is set without REDIS_SENTINELS")
    if config.redis_sentinels and config.redis_url.startswith("unix://"):
        raise ConfigError("REDIS_URL must be a redis:// or rediss:// URL with REDIS_SENTINELS (not unix://)")
    if config.broker_url is not None and config.broker_url.startswith(("redis://", "rediss://")):
        if config.broker_url != config.redis_url or config.redis_sentinels:
            raise ConfigError(
                "BROKER_URL may be a redis:// URL only if it is REDIS_URL itself (without REDIS_SENTINELS): "
                "the Redis broker is the store's Redis, where the API writes a task and its message in one "
                "step. Leave BROKER_URL unset for it, or set an amqp:// URL for RabbitMQ"
            )
    if config.redis_min_replicas_ack and config.redis_replica_ack_timeout >= config.store_timeout:
        raise ConfigError("REDIS_REPLICA_ACK_TIMEOUT must be shorter than STORE_TIMEOUT")
    if config.retry_max_delay < config.retry_base_delay:
        raise ConfigError("RETRY_MAX_DELAY must be at least RETRY_BASE_DELAY")
    if config.idempotency_ttl < 86400:
        raise ConfigError("IDEMPOTENCY_TTL must be at least 86400 (24 h)")
    if config.task_lease_seconds < 3 * config.sweep_interval:
        raise ConfigError("TASK_LEASE_SECONDS must be at least three times SWEEP_INTERVAL")
    if config.visibility_timeout <= config.upstream_timeout + config.upstream_connect_timeout:
        raise ConfigError(
            "VISIBILITY_TIMEOUT must be longer than UPSTREAM_TIMEOUT + UPSTREAM_CONNECT_TIMEOUT, "
            "or a slow job would be redelivered while it still runs"
        )
    if config.webhook_lease_seconds <= 2 * config.webhook_timeout:
        raise ConfigError(
            "WEBHOOK_LEASE_SECONDS must be more than twice WEBHOOK_TIMEOUT (connect + read), "
            "or a slow delivery would be sent again while it still runs"
        )
