"""Logs: the text format as it always was, LOG_FORMAT=json from every process of a real stack (the
workers, the webhook worker, the API under gunicorn), the task's id and tenant on the lines about it, and
no secret in any line."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from devstack.processes import HOST, Child, free_port, start_api, wait_until
from services import logs
from services.config import load_config
from services.leases import LeaseKeeper
from tests.receiver import Receiver
from tests.stack import Stack, running_stack, with_directive
from worker.logs import task_of_message

# --- the formats, the scope and the redaction, in this process ---------------------------------------


def capture(log_format: str, secrets_: dict[str, str] | None = None) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger(f"test-logs-{secrets.token_hex(4)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(logs.make_handler(load_config({"LOG_FORMAT": log_format, **(secrets_ or {})}), stream))
    return logger, stream


def test_the_text_format_is_the_one_it_always_was() -> None:
    logger, stream = capture("text")
    logger.info("task %s: succeeded", "t1")
    line = rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO {logger.name}: task t1: succeeded\n"
    assert re.fullmatch(line, stream.getvalue())
    assert logs.TEXT_FORMAT == "%(asctime)s %(levelname)s %(name)s: %(message)s"  # worker/app.py's, before


def test_a_json_line_carries_the_scope() -> None:
    logger, stream = capture("json")
    with logs.task_scope("t1"):
        logs.bind(tenant="acme")
        logger.info("two\nlines")
    logger.info("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "two\nlines" and first["level"] == "INFO" and first["logger"] == logger.name
    assert (first["task_id"], first["tenant"]) == ("t1", "acme")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert "task_id" not in second and "tenant" not in second


def test_a_task_scope_joins_the_scope_open_around_it() -> None:
    """What a service binds stays for the lines logged after it returned: Celery's "succeeded in", an
    access line."""
    token = logs.open_scope()
    try:
        with logs.task_scope("t1"):
            logs.bind(tenant="acme")
        assert logs.scope_fields() == {"task_id": "t1", "tenant": "acme"}
        with logs.task_scope("t2"):  # another task: a scope of its own, gone after the block
            assert logs.scope_fields() == {"task_id": "t2"}
        assert logs.scope_fields() == {"task_id": "t1", "tenant": "acme"}
    finally:
        logs.close_scope(token)
    assert logs.scope_fields() == {}
    logs.bind(task_id="t3")  # no scope open: nothing to bind to
    assert logs.scope_fields() == {}


def test_lease_lines_carry_the_scope_of_the_job() -> None:
    """The lease keeper renews in its own thread, in a copy of the job's context."""
    stream = io.StringIO()
    handler = logs.make_handler(load_config({"LOG_FORMAT": "json"}), stream)
    leases = logging.getLogger("services.leases")
    leases.addHandler(handler)
    keeper = LeaseKeeper(0.02)
    try:
        lost = lambda items: [False] * len(items)  # noqa: E731
        with logs.task_scope("t1", "acme"), keeper.keep("lease on task t1", lost, None):
            wait_until(lambda: "lost" in stream.getvalue(), timeout=5, what="the lost lease's line")
    finally:
        keeper.stop()
        leases.removeHandler(handler)
    line = json.loads(stream.getvalue().splitlines()[0])
    assert (line["task_id"], line["tenant"], line["thread"]) == ("t1", "acme", "lease-keeper")


SIGNED = (
    "http://127.0.0.1:9000/b/outputs/t/1/0.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20261202%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261202T052400Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=9f3c0ffee0ddf00d"
)


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        ("Authorization: Bearer sk-live-7f3a9c1e", "sk-live-7f3a9c1e", "Authorization: Bearer [REDACTED]"),
        ("headers {'authorization': 'sk-live-7f3a9c1e'}", "sk-live-7f3a9c1e", "'authorization': '"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "Basic [REDACTED]"),
        (f"GET {SIGNED}", "9f3c0ffee0ddf00d", "X-Amz-Signature=[REDACTED]"),
        (f"GET {SIGNED}", "AKIAEXAMPLE", "X-Amz-Date=20261202T052400Z"),
        ("https://hooks.example/x?token=tok123456&a=1", "tok123456", "token=[REDACTED]&a=1"),
        ("GET /img.png?key=abc123456&fail=0", "abc123456", "key=[REDACTED]&fail=0"),
        ("secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "MfKQ9r8GKYqrTwjUPD8IL", "whsec_[REDACTED]"),
        ("new key iqk_0123456789abcdefghij_-XY", "0123456789abcdefghij", "iqk_[REDACTED]"),
        (
            "broker redis://user:hunter2hunter2@redis:6379/0",
            "hunter2hunter2",
            "redis://user:[REDACTED]@redis",
        ),
        ("the configured key my-upstream-key-1 leaked", "my-upstream-key-1", "the configured key [REDACTED]"),
    ],
)
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_what_looks_like_a_secret_is_redacted(log_format: str, text: str, secret: str, kept: str) -> None:
    logger, stream = capture(log_format, {"UPSTREAM_API_KEY": "my-upstream-key-1"})
    logger.info("%s", text)
    try:
        raise RuntimeError(text)
    except RuntimeError:
        logger.exception("failed")
    output = stream.getvalue()
    assert secret not in output
    assert kept in output if log_format == "text" else kept in json.loads(output.splitlines()[0])["message"]


def test_what_is_no_secret_is_left_alone() -> None:
    logger, stream = capture("json", {"AWS_SECRET_ACCESS_KEY": "test"})  # too short to be searched for
    message = (
        "Connected to redis://:**@127.0.0.1:6379/0; bucket test-outputs; http://127.0.0.1:8000/v1/tasks/x"
    )
    logger.info(message)
    assert json.loads(stream.getvalue())["message"] == message


def test_configure_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        first = logs.configure(load_config({}))
        second = logs.configure(load_config({"LOG_FORMAT": "json"}))
        assert first not in root.handlers and second in root.handlers
        assert [h for h in root.handlers if h is not second] == before, "the test runner's handlers stay"
    finally:
        root.handlers[:] = before
        root.setLevel(level)
        logging.captureWarnings(False)


@pytest.mark.parametrize(
    ("name", "argsrepr", "task_id"),
    [
        ("imagegen.generate", "['0c6fc510-e4f2-4038']", "0c6fc510-e4f2-4038"),
        ("imagegen.deliver_webhook", "['msg_0c6f-a1_succeeded', 'claim']", "0c6f-a1"),
        ("imagegen.generate", "not python", None),
        ("other.task", "['x']", None),
    ],
)
def test_the_task_of_a_celery_message(name: str, argsrepr: str, task_id: str | None) -> None:
    assert task_of_message(name, argsrepr) == task_id


# --- LOG_FORMAT=json on a real stack -----------------------------------------------------------------

TENANT = "acme"


@dataclass
class Run:
    stack: Stack
    api_log: Path
    task_id: str  # submitted through the in-process API, with a webhook
    api_task_id: str  # submitted through gunicorn
    directive_key: str  # a value in the query of the image URL the worker downloads
    secrets: dict[str, str] = field(default_factory=dict)


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` as JSON (a line that is not fails the test, naming it)."""
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            pytest.fail(f"{path.name}:{number} is not JSON: {text!r}")
        assert isinstance(line, dict) and {"time", "level", "logger", "message"} <= set(line), text
        lines.append(line)
    return lines


def signatures(url: str) -> list[str]:
    return parse_qs(urlsplit(url).query).get("X-Amz-Signature", [])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """A stack with LOG_FORMAT=json and secrets long enough to be searched for, an API under gunicorn on
    it, and one run through everything: a task with an image URL and a webhook, a presigned output, a key
    made through the admin API. The in-process API configures this process's logging: restored after."""
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    used = {
        "tenant key": f"tenant-key-{secrets.token_hex(12)}",
        "admin key": f"admin-key-{secrets.token_hex(12)}",
        "upstream key": f"upstream-key-{secrets.token_hex(12)}",
        "S3 secret key": f"s3-secret-{secrets.token_hex(12)}",
    }
    with running_stack(
        tmp_path_factory.mktemp("json-logs"),
        LOG_FORMAT="json",
        API_KEYS=f"{TENANT}:{used['tenant key']}",
        ADMIN_API_KEY=used["admin key"],
        UPSTREAM_API_KEY=used["upstream key"],
        AWS_SECRET_ACCESS_KEY=used["S3 secret key"],
    ) as stack:
        try:
            yield _run_everything(stack, used)
        finally:
            root_logger.handlers[:] = handlers
            root_logger.setLevel(level)
            logging.captureWarnings(False)


def _run_everything(stack: Stack, used: dict[str, str]) -> Run:
    headers = stack.headers(TENANT)
    used["default webhook secret"] = stack.env["WEBHOOK_SIGNING_SECRET"]
    tenant_secret = stack.http.get(f"{stack.api_url}/v1/webhooks/secret", headers=headers).json()["key"]
    used["tenant webhook secret"] = tenant_secret
    receiver = Receiver(tenant_secret)
    try:
        hook = "/hooks?token=hook-token-1"
        body = {**with_directive(shape="openai_url"), "webhook_url": receiver.url(hook)}
        directive_key = body["contents"][0]["parts"][0]["text"].split("key=")[1].split()[0].rstrip("]")
        task_id = stack.submit(body, tenant=TENANT).json()["id"]
        task = stack.wait_final(task_id)
        assert task["status"] == "succeeded", task
        [delivered] = receiver.wait_for(hook, 1)
        assert delivered.verify_error is None and delivered.payload["type"] == "task.succeeded"
        wait_until(
            lambda: [d["outcome"] for d in stack.task(task_id)["webhook"]["deliveries"]] == ["delivered"],
            timeout=20,
            what="the delivery's record",
        )
        presigned = [task["outputs"][0]["url"], delivered.payload["data"]["outputs"][0]["url"]]
    finally:
        receiver.stop()

    port = free_port()
    api = start_api({**stack.env}, port, log_dir=stack.log_dir, workers=1, threads=4)
    try:
        base = f"http://{HOST}:{port}"
        made = httpx.post(
            f"{base}/v1/admin/tenants/{TENANT}/keys", headers={"Authorization": f"Bearer {used['admin key']}"}
        )
        assert made.status_code == 201, made.text
        used["key made by the admin API"] = made.json()["key"]
        auth = {"Authorization": f"Bearer {used['key made by the admin API']}"}
        submitted = httpx.post(f"{base}/v1/images/generations", json=with_directive(), headers=auth)
        api_task_id = submitted.json()["id"]
        wait_until(
            lambda: httpx.get(f"{base}/v1/tasks/{api_task_id}", headers=auth).json()["status"] == "succeeded",
            timeout=30,
            what="the task submitted through gunicorn",
        )
        redirect = httpx.get(f"{base}/v1/tasks/{api_task_id}/outputs/0", headers=auth)
        assert redirect.status_code == 302
        presigned.append(redirect.headers["location"])
        assert httpx.get(f"{base}/v1/tasks/{api_task_id}-nope", headers=auth).status_code == 404
        wrong = {"Authorization": "Bearer wrong"}
        assert httpx.get(f"{base}/v1/tasks/{api_task_id}", headers=wrong).status_code == 401
    finally:
        _stop(api)
    for number, url in enumerate(presigned):
        [signature] = signatures(url)
        used[f"presigned URL signature {number}"] = signature
    stack.children["webhook-worker"].stop()  # its shutdown lines too (SIGTERM: Celery's warm shutdown)
    time.sleep(0.5)  # the generation worker's last lines
    return Run(stack, stack.log_dir / "api.log", task_id, api_task_id, directive_key, used)


def _stop(child: Child) -> None:
    """SIGTERM, so that gunicorn's shutdown lines are in its log too."""
    child.stop()


def worker_logs(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    return {
        name: json_lines(child.log_path)
        for name, child in stack.children.items()
        if "worker" in name and child.log_path is not None
    }


def about(lines: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    """The lines about a task: its id in the message or in the line's ``task_id``."""
    return [line for line in lines if task_id in line["message"] or line.get("task_id") == task_id]


def test_every_worker_line_is_json_with_the_task_and_tenant(run: Run) -> None:
    by_worker = worker_logs(run.stack)
    assert set(by_worker) == {"worker0", "webhook-worker"}
    generation = about(by_worker["worker0"], run.task_id)
    webhooks = about(by_worker["webhook-worker"], run.task_id)
    for line in generation + webhooks:
        assert line.get("task_id") == run.task_id, line
        if line["logger"] != "celery.worker.strategy":  # received: the tenant is not read yet
            assert line.get("tenant") == TENANT, line
    loggers = {line["logger"] for line in generation}
    assert {"celery.worker.strategy", "httpx", "services.jobs", "celery.app.trace"} <= loggers, generation
    assert any(line["message"].endswith("1 output(s)") for line in generation)
    assert any(re.search(r"attempt 1: delivered \(200", line["message"]) for line in webhooks), webhooks
    assert {"celery.worker.strategy", "celery.app.trace"} <= {line["logger"] for line in webhooks}
    for lines in by_worker.values():  # Celery's own: the banner is one JSON line
        assert any(re.search(r" starting: celery .* queues ", line["message"]) for line in lines)
    stopped = [line["message"] for line in by_worker["webhook-worker"]]  # what its signal handler wrote
    assert "worker: Warm shutdown (MainProcess)" in stopped, stopped


def test_every_api_line_is_json_under_gunicorn(run: Run) -> None:
    lines = json_lines(run.api_log)
    messages = [line["message"] for line in lines]
    assert any(message.startswith("Listening at: ") for message in messages), messages
    assert any(message.startswith("Shutting down") for message in messages), messages
    access = [line for line in lines if line["logger"] == "gunicorn.access"]
    tasks = [line for line in access if f"/v1/tasks/{run.api_task_id}" in line["message"]]
    assert len(tasks) >= 4, tasks
    assert all(line.get("task_id", "").startswith(run.api_task_id) for line in tasks), tasks
    # the tenant once the caller is known: not on a 401
    assert all(line.get("tenant") == TENANT for line in tasks if '" 401 ' not in line["message"]), tasks
    assert any('" 401 ' in line["message"] and "tenant" not in line for line in tasks), tasks
    [submitted] = [line for line in access if "POST /v1/images/generations" in line["message"]]
    assert (submitted.get("task_id"), submitted.get("tenant")) == (run.api_task_id, TENANT), submitted
    assert all("task_id" not in line for line in access if "/v1/admin/" in line["message"])


def test_no_secret_in_any_line(run: Run) -> None:
    """The secrets of the run, searched for in every log our processes wrote; the image URL's query
    shows the redaction at work on a real line."""
    texts = {path.name: path.read_text() for path in run.stack.log_dir.glob("*.log")}
    ours = {name: texts[name] for name in ("worker0.log", "webhook-worker.log", "api.log")}
    for what, secret in run.secrets.items():
        for name, text in ours.items():
            assert secret not in text, f"the {what} is in {name}"
    worker = ours["worker0.log"]
    assert run.directive_key not in worker and "key=[REDACTED]&fail=" in worker
    assert "hook-token-1" not in ours["webhook-worker.log"]
    assert all(len(secret) >= logs.MIN_SECRET_LENGTH for secret in run.secrets.values())
    print(json.dumps(about(json_lines(run.stack.log_dir / "worker0.log"), run.task_id)[-2]), file=sys.stderr)
