"""Configuration: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from api import create_app
from services.config import VARIABLES, load_config
from services.errors import ConfigError


def test_defaults_need_no_variable() -> None:
    config = load_config({})
    assert config.max_attempts == 5 and config.worker_pool == "threads" and not config.auth_required


def test_values_are_parsed() -> None:
    config = load_config(
        {"API_KEYS": "a, b,,", "UPSTREAM_TIMEOUT": "12.5", "UPSTREAM_BASE_URL": "http://x.test/"}
    )
    assert config.api_keys == (("default", "a"), ("default", "b")) and config.auth_required
    assert config.upstream_timeout == 12.5
    assert config.upstream_base_url == "http://x.test"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "localhost:6379"),
        ("UPSTREAM_BASE_URL", "ftp://x"),
        ("MAX_ATTEMPTS", "0"),
        ("MAX_ATTEMPTS", "three"),
        ("UPSTREAM_TIMEOUT", "-1"),
        ("WORKER_POOL", "gevent"),
        ("S3_PRESIGN_EXPIRES", "1.5"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_invalid_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name} is invalid: must ") as raised:
        load_config({name: value})
    assert value not in raised.value.message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("name", ["UPSTREAM_TIMEOUT", "RETRY_BASE_DELAY", "WEBHOOK_RETRY_SCHEDULE"])
def test_numbers_must_be_finite(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name} is invalid"):
        load_config({name: value})


SECRET = "sk-live-7f3a9c1e2b"


@pytest.mark.parametrize("name", VARIABLES)
@pytest.mark.parametrize("value", [SECRET, f"0,{SECRET}", f"whsec_{SECRET}", f"tenant:{SECRET},bad tenant:x"])
def test_an_error_never_shows_the_value(name: str, value: str) -> None:
    """A secret pasted into the wrong variable (or a malformed secret) must not end up in a log."""
    try:
        load_config({name: value})
    except ConfigError as exc:
        assert name in exc.message
        assert SECRET not in "".join(traceback.format_exception(exc)), "a traceback shows it"


@pytest.mark.parametrize(
    ("env", "starts"),
    [
        ({"ALLOW_OPEN_API": "false"}, False),
        ({"ALLOW_OPEN_API": "false", "API_KEYS": "app:k1"}, True),
        ({"ALLOW_OPEN_API": "false", "ADMIN_API_KEY": "admin-key"}, True),
        ({"ALLOW_OPEN_API": "true"}, True),
        ({}, True),  # make run: open for local use
    ],
)
def test_an_open_api_starts_only_when_allowed(env: dict[str, str], starts: bool) -> None:
    config = load_config(env)
    if starts:
        assert create_app(config)
        return
    with pytest.raises(ConfigError, match="API_KEYS or ADMIN_API_KEY, or ALLOW_OPEN_API=true"):
        create_app(config)


def test_make_run_stays_open() -> None:
    """devstack (make run) passes its environment on as it is: it never sets ALLOW_OPEN_API=false, the
    Docker image's default, and the variable's own default is true."""
    root = Path(__file__).resolve().parents[1]
    assert not any("ALLOW_OPEN_API" in path.read_text() for path in (root / "devstack").glob("*.py"))
    assert load_config({}).allow_open_api


def test_visibility_timeout_must_outlast_a_call() -> None:
    with pytest.raises(ConfigError, match="VISIBILITY_TIMEOUT"):
        load_config({"UPSTREAM_TIMEOUT": "600", "VISIBILITY_TIMEOUT": "300"})


def test_devstack_stops_at_start_up_on_an_invalid_variable(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devstack"],
        env={"PATH": "/usr/bin:/bin", "MAX_ATTEMPTS": "zero", "DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "MAX_ATTEMPTS" in result.stderr


def test_every_variable_is_documented() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    example = (root / ".env.example").read_text()
    for name in VARIABLES:
        assert f"`{name}`" in readme, f"{name} is not in README.md's configuration table"
        assert f"# {name}=" in example, f"{name} is not in .env.example"


def test_sentinels_are_parsed() -> None:
    config = load_config(
        {
            "REDIS_SENTINELS": " 10.0.0.1:26379, sentinel-2.internal:26380,[fd00::3]:26381,",
            "REDIS_SENTINEL_MASTER": "imagegen",
            "REDIS_SENTINEL_PASSWORD": "s3cret",
            "REDIS_MIN_REPLICAS_ACK": "1",
        }
    )
    assert config.redis_sentinels == (("10.0.0.1", 26379), ("sentinel-2.internal", 26380), ("fd00::3", 26381))
    assert config.redis_sentinel_master == "imagegen" and config.redis_min_replicas_ack == 1
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize("value", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", ":26379", "a:b", ",", "u@h:1"])
def test_invalid_sentinels_name_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="^REDIS_SENTINELS is invalid: must be comma-separated host:port"):
        load_config({"REDIS_SENTINELS": value, "REDIS_SENTINEL_MASTER": "m"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_SENTINELS": "h:26379"}, "REDIS_SENTINELS and REDIS_SENTINEL_MASTER must be set together"),
        ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS and REDIS_SENTINEL_MASTER must be set together"),
        ({"REDIS_SENTINEL_PASSWORD": "p"}, "REDIS_SENTINEL_PASSWORD is set without REDIS_SENTINELS"),
        (
            {
                "REDIS_SENTINELS": "h:26379",
                "REDIS_SENTINEL_MASTER": "m",
                "REDIS_URL": "unix:///run/redis.sock",
            },
            "REDIS_URL must be a redis:// or rediss:// URL with REDIS_SENTINELS",
        ),
        (
            {"REDIS_MIN_REPLICAS_ACK": "1", "REDIS_REPLICA_ACK_TIMEOUT": "2"},
            "REDIS_REPLICA_ACK_TIMEOUT must be",
        ),
        ({"REDIS_MIN_REPLICAS_ACK": "-1"}, "REDIS_MIN_REPLICAS_ACK is invalid"),
    ],
)
def test_sentinel_settings_are_checked_together(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(env)
