"""What clients see of our own failures: fixed words and the error's class, never a host, an address or a
library's text. The detail is in the log and the exception chain."""

from __future__ import annotations

import botocore.exceptions
import pytest
import redis

from devstack.processes import free_port
from services.errors import StorageUnavailable, StoreUnavailable
from services.redis_errors import mapped_redis_errors
from services.storage import _mapped_errors


def test_an_unreachable_store_is_named_not_located(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    with pytest.raises(StoreUnavailable) as raised, mapped_redis_errors():
        client.ping()
    assert raised.value.message == "the task store is unavailable (ConnectionError)"
    assert isinstance(raised.value.__cause__, redis.ConnectionError)
    assert f"127.0.0.1:{port}" in caplog.text


def test_a_store_that_refuses_says_which_refusal() -> None:
    reply = redis.ResponseError("OOM command not allowed when used memory > 'maxmemory' on 10.0.0.3")
    with pytest.raises(StoreUnavailable) as raised, mapped_redis_errors():
        raise reply
    assert raised.value.message == "the task store cannot serve requests now (OOM)"
    assert raised.value.__cause__ is reply


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (
            botocore.exceptions.EndpointConnectionError(endpoint_url="http://minio.internal:9000/b/k"),
            "storage could not upload (EndpointConnectionError)",
        ),
        (
            botocore.exceptions.ClientError(
                {"Error": {"Code": "AccessDenied", "Message": "no access to arn:aws:s3:::secret-bucket"}},
                "PutObject",
            ),
            "storage could not upload (ClientError AccessDenied)",
        ),
        (
            botocore.exceptions.ClientError({"Error": {"Code": "odd code from 10.1.2.3"}}, "PutObject"),
            "storage could not upload (ClientError)",
        ),
    ],
)
def test_storage_failures_are_named_not_located(
    error: Exception, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(StorageUnavailable) as raised, _mapped_errors("upload"):
        raise error
    assert raised.value.message == shown
    assert raised.value.__cause__ is error
    assert str(error) in caplog.text
