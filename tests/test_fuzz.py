"""Bad input at scale: schemathesis generates requests from /openapi.json (valid and invalid ones) against
the real stack. No request may get a 5xx, and every 4xx must be in the error format."""

from __future__ import annotations

import copy

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api.openapi import openapi_document
from tests.stack import Stack

schema = schemathesis.openapi.from_dict(copy.deepcopy(openapi_document(auth_required=False)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_4xx_in_the_error_format(case, stack: Stack) -> None:
    response = case.call(base_url=stack.api_url, timeout=10)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert isinstance(error["code"], str) and error["code"]
        assert isinstance(error["message"], str) and error["message"]
        assert "field" in error
