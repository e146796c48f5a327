"""/openapi.json is a valid OpenAPI 3 document, and the API's real responses match it."""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

import httpx
import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource

from devstack.processes import free_port, wait_until
from tests.stack import ApiServer, Stack, seed_body, with_directive


@pytest.fixture(scope="module")
def document(stack: Stack) -> dict[str, Any]:
    response = stack.http.get(f"{stack.api_url}/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    validate(spec)
    return spec


def check(document: dict[str, Any], path: str, method: str, response: httpx.Response) -> None:
    """Assert that ``response`` is one the document declares for that operation, with a matching body."""
    declared = document["paths"][path][method]["responses"]
    assert str(response.status_code) in declared, (
        f"{method.upper()} {path}: {response.status_code} not declared"
    )
    content = declared[str(response.status_code)].get("content", {})
    if "application/json" not in content or "schema" not in content["application/json"]:
        return
    registry = Registry().with_resource("urn:spec", Resource.opaque(document))
    schema = {**content["application/json"]["schema"]}
    if "$ref" in schema:
        schema = {"$ref": "urn:spec" + schema["$ref"]}
    OAS30Validator(schema, registry=registry).validate(response.json())


def test_security_describes_the_server(document: dict[str, Any], stack: Stack) -> None:
    """Without API_KEYS a bearer token is optional; with them it is required, on /v1/ only."""
    assert document["security"] == [{}, {"bearer": []}]
    api = ApiServer(dataclasses.replace(stack.config, api_keys=(("default", "k"),)))
    try:
        keyed = stack.http.get(f"{api.url}/openapi.json")
    finally:
        api.stop()
    assert keyed.status_code == 200, "the document needs no key"
    validate(keyed.json())
    assert keyed.json()["security"] == [{"bearer": []}]
    assert {key: value for key, value in keyed.json().items() if key != "security"} == {
        key: value for key, value in document.items() if key != "security"
    }
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if path.startswith("/v1/admin/"):
                assert operation["security"] == [{"admin": []}], f"{path} needs the admin key"
                assert "401" in operation["responses"]
            elif path.startswith("/v1/"):
                assert "security" not in operation, "the document's security applies"
                assert "401" in operation["responses"]
            else:
                assert operation["security"] == [], f"{path} is open"


# Served but not API operations, so not in the document: static files (Flask's own ``/static/``, Swagger
# UI's under ``/docs/static/``: the page ``/docs`` is documented; tests/test_docs.py), and the web
# console's page and assets (api/console.py; tests/test_console.py).
NOT_DOCUMENTED = {"/console/", "/console/<path:filename>"}


def test_every_path_is_served(document: dict[str, Any], stack: Stack) -> None:
    """Every route is a documented path, but static files and the console (``NOT_DOCUMENTED``)."""
    rules = list(stack.api.app.url_map.iter_rules())
    static = {rule.rule for rule in rules if rule.endpoint == "static" or rule.endpoint.endswith(".static")}
    assert static == {"/static/<path:filename>", "/docs/static/<path:filename>"}
    routes = {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)  # <int:index> -> {index}
        for rule in rules
        if rule.rule not in static and rule.rule not in NOT_DOCUMENTED
    }
    assert routes == set(document["paths"])


def test_real_responses_match_the_document(document: dict[str, Any], stack: Stack) -> None:
    api = stack.api_url
    accepted = stack.submit(seed_body())
    check(document, "/v1/images/generations", "post", accepted)
    task_id = accepted.json()["id"]
    check(document, "/v1/tasks/{task_id}", "get", stack.http.get(f"{api}/v1/tasks/{task_id}"))
    stack.wait_final(task_id)
    check(document, "/v1/tasks/{task_id}", "get", stack.http.get(f"{api}/v1/tasks/{task_id}"))
    check(
        document,
        "/v1/tasks/{task_id}/outputs/{index}",
        "get",
        stack.http.get(f"{api}/v1/tasks/{task_id}/outputs/0"),
    )

    failed = stack.run(with_directive(script="503"))
    check(document, "/v1/tasks/{task_id}", "get", stack.http.get(f"{api}/v1/tasks/{failed['id']}"))

    check(document, "/v1/images/generations", "post", stack.submit({"model": 1}))
    check(
        document,
        "/v1/images/generations",
        "post",
        stack.http.post(f"{api}/v1/images/generations", content=b"x"),
    )
    check(document, "/v1/tasks/{task_id}", "get", stack.http.get(f"{api}/v1/tasks/missing"))
    check(
        document,
        "/v1/tasks/{task_id}/outputs/{index}",
        "get",
        stack.http.get(f"{api}/v1/tasks/{task_id}/outputs/9"),
    )
    check(document, "/v1/tasks/{task_id}/cancel", "post", stack.http.post(f"{api}/v1/tasks/{task_id}/cancel"))
    canceled = stack.submit(with_directive(delay_ms="1000")).json()["id"]
    check(
        document, "/v1/tasks/{task_id}/cancel", "post", stack.http.post(f"{api}/v1/tasks/{canceled}/cancel")
    )
    check(document, "/healthz", "get", stack.http.get(f"{api}/healthz"))
    check(document, "/readyz", "get", stack.http.get(f"{api}/readyz"))


def test_the_metadata_filters_are_documented_as_the_api_reads_them(
    document: dict[str, Any], stack: Stack
) -> None:
    """``metadata.<key>=<value>``, a family of query parameters, is one exploded form object in the
    document: each of its properties, named ``metadata.<key>``, is sent as a parameter of its own."""
    operation = document["paths"]["/v1/tasks"]["get"]
    [metadata] = [parameter for parameter in operation["parameters"] if parameter["name"] == "metadata"]
    assert (metadata["in"], metadata["style"], metadata["explode"]) == ("query", "form", True)
    assert all(name.startswith("metadata.") for name in metadata["example"])
    run = uuid.uuid4().hex
    task_id = stack.submit({**seed_body(), "metadata": {"run": run}}).json()["id"]
    filters = {"metadata.run": run}  # the object, serialized as the document says
    OAS30Validator(metadata["schema"]).validate(filters)
    response = stack.http.get(f"{stack.api_url}/v1/tasks", params=filters)
    check(document, "/v1/tasks", "get", response)
    assert [task["id"] for task in response.json()["data"]] == [task_id]


def test_webhook_responses_match_the_document(document: dict[str, Any], stack: Stack) -> None:
    api = stack.api_url
    path = "/v1/tasks/{task_id}/webhook/redeliver"
    down = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens: failed attempts, then given up
    task_id = stack.submit({**seed_body(), "webhook_url": down, "webhook_events": ["running", "failed"]})
    task_id = task_id.json()["id"]
    wait_until(
        lambda: len(stack.task(task_id)["webhook"]["deliveries"]) >= 3, timeout=20, what="delivery attempts"
    )
    check(document, "/v1/tasks/{task_id}", "get", stack.http.get(f"{api}/v1/tasks/{task_id}"))
    check(document, path, "post", stack.http.post(f"{api}/v1/tasks/{task_id}/webhook/redeliver"))
    plain = stack.run(seed_body())["id"]
    check(document, path, "post", stack.http.post(f"{api}/v1/tasks/{plain}/webhook/redeliver"))
    check(document, path, "post", stack.http.post(f"{api}/v1/tasks/missing/webhook/redeliver"))
    refused = stack.submit({**seed_body(), "webhook_url": "https://169.254.169.254/latest"})
    assert refused.status_code == 400
    check(document, "/v1/images/generations", "post", refused)


def test_waiting_responses_match_the_document(document: dict[str, Any], stack: Stack) -> None:
    """Prefer: wait on submit and on GET, and the event stream (tests/test_task_events.py has the rest)."""
    api = stack.api_url
    submit = "/v1/images/generations"
    done = stack.submit(seed_body(), headers={"Prefer": "wait=30"})
    assert done.status_code == 201
    check(document, submit, "post", done)
    slow = stack.submit(with_directive(delay_ms="1500"), headers={"Prefer": "wait=1"})
    assert slow.status_code == 202
    check(document, submit, "post", slow)
    task_id = slow.json()["id"]
    waited = stack.http.get(f"{api}/v1/tasks/{task_id}", headers={"Prefer": "wait=30"})
    check(document, "/v1/tasks/{task_id}", "get", waited)
    events = "/v1/tasks/{task_id}/events"
    check(document, events, "get", stack.http.get(f"{api}/v1/tasks/{task_id}/events"))
    check(document, events, "get", stack.http.get(f"{api}/v1/tasks/missing/events"))
    bad = stack.http.get(f"{api}/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "x"})
    check(document, events, "get", bad)


def test_batch_responses_match_the_document(document: dict[str, Any], stack: Stack) -> None:
    api = stack.api_url
    body = {"requests": [seed_body(), seed_body()], "webhook_url": f"http://127.0.0.1:{free_port()}/b"}
    accepted = stack.http.post(f"{api}/v1/batches", json=body)
    check(document, "/v1/batches", "post", accepted)
    batch_id = accepted.json()["id"]
    check(document, "/v1/batches/{batch_id}", "get", stack.http.get(f"{api}/v1/batches/{batch_id}"))
    check(document, "/v1/tasks", "get", stack.http.get(f"{api}/v1/tasks", params={"batch_id": batch_id}))
    check(document, "/v1/batches", "post", stack.http.post(f"{api}/v1/batches", json={"requests": []}))
    check(document, "/v1/batches/{batch_id}", "get", stack.http.get(f"{api}/v1/batches/batch_missing"))
    canceling = stack.http.post(f"{api}/v1/batches", json={"requests": [with_directive(delay_ms="1000")]})
    canceled = stack.http.post(f"{api}/v1/batches/{canceling.json()['id']}/cancel")
    check(document, "/v1/batches/{batch_id}/cancel", "post", canceled)
    check(
        document,
        "/v1/batches/{batch_id}/cancel",
        "post",
        stack.http.post(canceled.json()["links"]["self"] + "/cancel"),
    )
    wait_until(
        lambda: stack.http.get(f"{api}/v1/batches/{batch_id}").json()["completed_at"],
        timeout=30,
        what="the batch",
    )
    check(document, "/v1/batches/{batch_id}", "get", stack.http.get(f"{api}/v1/batches/{batch_id}"))
