"""Bad input at scale: schemathesis generates requests from the OpenAPI document (valid and invalid ones)
and sends them to the real stack, through an API that requires API keys (API_KEYS).

Every response must be one the document declares: its status code, content type, headers and body
schema (``CHECKS``), and every 4xx is in the error format. Without a key, or with a wrong one, every
``/v1/`` request is 401. The stateful test follows the document's links, so that cancel, redeliver and
the output redirect run on tasks that submit really created, not only on random ids.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from api.openapi import openapi_document
from devstack.processes import HOST
from tests.stack import ApiServer, Stack, listening_socket, running_stack

KEY, STATEFUL_KEY = "fuzz-key-one", "fuzz-key-two"
WRONG_KEY = "fuzz-key-wrong"
ADMIN_KEY = "fuzz-admin-key"
# The fuzzed admin API may change any tenant's settings: the keys' tenant is a name it will not guess.
TENANT = "fuzz-tenant-5b1e9c2d7a"

# A submission's answers: 202, or 201 with Prefer: wait when the task was final within the wait.
ACCEPTED = (201, 202)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _schema() -> OpenApiSchema:
    # A copy: schemathesis may add to the document it is given, and openapi_document() is shared.
    schema = schemathesis.openapi.from_dict(copy.deepcopy(openapi_document(auth_required=True)))
    # The API key is ours to send (a valid one, none, a wrong one): schemathesis adds no Authorization.
    schema.config.generation.update(with_security_parameters=False)
    # The stateful test follows the document's links only. Links schemathesis would infer (from
    # redeliver's 202) start from responses whose status depends on timing (has the task an event
    # yet?); Hypothesis replays a scenario's choices and fails as flaky when the steps on offer differ.
    schema.config.phases.stateful.inference.algorithms = []
    return schema


schema = _schema()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own, with NO webhook worker: generated webhook URLs (any host, public ones too,
    in negative mode as well) are accepted and their events kept, so that redeliver runs on real
    events, but nothing is ever sent to them."""
    with running_stack(tmp_path_factory.mktemp("fuzz"), webhook_worker=False) as stack:
        yield stack


@pytest.fixture(scope="module")
def keyed_api(fuzz_stack: Stack) -> Iterator[ApiServer]:
    listener = listening_socket()
    config = dataclasses.replace(
        fuzz_stack.config,
        api_keys=((TENANT, KEY), (TENANT, STATEFUL_KEY)),
        admin_api_key=ADMIN_KEY,
        public_base_url=f"http://{HOST}:{listener.getsockname()[1]}",
    )
    api = ApiServer(config, listener)
    yield api
    api.stop()


def assert_error_format(response: Response) -> None:
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert isinstance(error["code"], str) and error["code"], response.text
        assert isinstance(error["message"], str) and error["message"], response.text
        assert "field" in error, response.text


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_response_is_documented_and_v1_needs_a_key(case: Case, keyed_api: ApiServer) -> None:
    key = ADMIN_KEY if case.path.startswith("/v1/admin/") else KEY
    response = case.call_and_validate(base_url=keyed_api.url, headers=bearer(key), checks=CHECKS, timeout=10)
    assert_error_format(response)

    # The same request without a key, and with a wrong one.
    for headers in ({}, bearer(WRONG_KEY)):
        response = case.call(base_url=keyed_api.url, headers=headers, timeout=10)
        if case.path.startswith("/v1/"):
            assert response.status_code == 401, (case.method, case.formatted_path, response.text[:500])
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.json()["error"]["field"] == "Authorization"
            case.validate_response(response, checks=CHECKS, transport_kwargs={"base_url": keyed_api.url})
        else:
            assert response.status_code != 401, (case.method, case.formatted_path)


class Outcomes:
    """What the stateful run did: each operation's statuses, and the tasks that submit created."""

    def __init__(self) -> None:
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.on_real_tasks: Counter[tuple[str, int]] = Counter()
        self.submits: Counter[tuple[str, int]] = Counter()  # (generation mode, status)
        self.positive_rejections: Counter[str] = Counter()  # "status code field"
        self.created: set[str] = set()

    def record(self, case: Case, response: Response) -> None:
        """Record one step and check what the API promises about the tasks submit created."""
        operation = case.operation.definition.raw["operationId"]
        self.statuses[(operation, response.status_code)] += 1
        if operation == "submitGeneration":
            mode = case.meta.generation.mode.value if case.meta is not None else "?"
            self.submits[(mode, response.status_code)] += 1
            if mode == GenerationMode.POSITIVE.value and response.status_code not in ACCEPTED:
                error = response.json()["error"]
                self.positive_rejections[f"{response.status_code} {error['code']} {error['field']}"] += 1
            if response.status_code in ACCEPTED:
                body = response.json()
                self.created.add(body["id"])
                assert response.headers["location"] == [body["links"]["self"]]
            return
        task_id = (case.path_parameters or {}).get("task_id")
        if task_id not in self.created:
            return
        self.on_real_tasks[(operation, response.status_code)] += 1
        status = response.status_code
        body = response.json() if status != 302 else None  # a redirect's body is HTML
        # Each task runs on the worker meanwhile: both outcomes of a race are valid.
        if operation == "getTask":
            assert status == 200 and body["id"] == task_id, response.text
        elif operation == "cancelTask":
            # canceled now, or already final (succeeded, failed, canceled by an earlier step)
            assert (status == 200 and body["status"] == "canceled") or (
                status == 409 and body["error"]["code"] == "invalid_transition"
            ), response.text
        elif operation == "redeliverWebhook":
            # due again, or the task has no webhook or no event yet
            assert (status == 202 and body["task_id"] == task_id) or (
                status == 409 and body["error"]["code"] == "no_webhook"
            ), response.text
        elif operation == "getOutput":
            # the output's URL, or no such output (not finished, failed, or another index); an index that
            # is no number (a negative case) matches no route
            index = str((case.path_parameters or {}).get("index"))
            no_route = not (index.isascii() and index.isdigit())
            assert status == 302 or (status == 404 and (no_route or body["error"]["field"] == "index")), (
                response.text
            )

    def accepted_fraction(self, mode: str | None = None) -> float:
        counts = [count for (m, _), count in self.submits.items() if mode in (None, m)]
        accepted = sum(count for (m, s), count in self.submits.items() if mode in (None, m) and s in ACCEPTED)
        return accepted / max(1, sum(counts))

    def summary(self) -> str:
        lines = [
            f"  {operation} {status}: {count}" for (operation, status), count in sorted(self.statuses.items())
        ]
        lines += [
            f"  on real tasks: {operation} {status}: {count}"
            for (operation, status), count in sorted(self.on_real_tasks.items())
        ]
        lines.append(
            f"  submits accepted: {self.accepted_fraction():.0%} of {sum(self.submits.values())}, "
            f"{self.accepted_fraction(GenerationMode.POSITIVE.value):.0%} of the positive ones"
        )
        lines += [
            f"  positive submit rejected: {why}: {count}" for why, count in self.positive_rejections.items()
        ]
        return "\n".join(lines)


def test_stateful_cancel_and_redeliver_on_real_tasks(keyed_api: ApiServer) -> None:
    outcomes = Outcomes()

    class Workflow(schema.as_state_machine()):
        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"base_url": keyed_api.url, "headers": bearer(STATEFUL_KEY), "timeout": 10}

        def validate_response(
            self, response: Response, case: Case, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs, recorder=self.recorder)
            assert_error_format(response)
            outcomes.record(case, response)

    Workflow.run(
        settings=settings(
            max_examples=30,
            stateful_step_count=8,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate],
        )
    )
    print(f"\nstateful run:\n{outcomes.summary()}")
    # The point of the links: cancel and redeliver ran on tasks that exist.
    real = {operation for operation, _ in outcomes.on_real_tasks}
    assert {"cancelTask", "redeliverWebhook"} <= real, outcomes.summary()
    assert outcomes.accepted_fraction(GenerationMode.POSITIVE.value) >= 0.5, outcomes.summary()
