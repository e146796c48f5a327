"""The web console (``/console``, ``api/console.py``): served without a key, and used as a person would in
headless Chromium against the real stack (API, workers, simulator and S3 as processes).

The browser is Debian's ``chromium`` (``make setup`` installs it), driven by Playwright, which never downloads
a browser of its own here; ``launch()`` gives each run a new, empty profile directory. Without the binary the
browser tests skip. Every wait is Playwright's ``expect``/``wait_for_*`` with a deadline.

``CONSOLE_SCREENSHOT=docs/console.png`` also writes the screenshot the README shows: the list with its
thumbnails beside a task's page.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, Route, expect, sync_playwright

from tests.receiver import Receiver
from tests.stack import ApiServer, Stack, seed_body, with_directive

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# as this machine's notes say: no sandbox (root), no GPU, and no calls home (the network is closed)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEADLINE_MS = 30_000
SCREENSHOT = os.environ.get("CONSOLE_SCREENSHOT")
# a 16x16 PNG, the seed request's first input image
INPUT_PNG = seed_body()["contents"][0]["parts"][1]["inline_data"]["data"]

expect.set_options(timeout=DEADLINE_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"no chromium binary at {CHROMIUM}: `make setup` installs Debian's chromium (or set CHROMIUM)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a context of its own (its own sessionStorage); fails the test on a script error or a
    Content-Security-Policy violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=False)
    page = context.new_page()
    page.set_default_timeout(DEADLINE_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            problems.append(f"CSP: {message.text}")

    page.on("console", on_console)
    yield page
    context.close()
    assert not problems


def open_console(page: Page, base_url: str) -> None:
    page.goto(f"{base_url}/console")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def submit_from_form(page: Page, prompt: str, **fields: str) -> str:
    """Fill the form, submit it, and return the new task's id from the API's answer."""
    page.fill("#prompt", prompt)
    for selector, value in fields.items():
        page.select_option(f"#{selector}", value)
    with page.expect_response(
        lambda response: response.url.endswith("/v1/images/generations") and response.request.method == "POST"
    ) as answer:
        page.click("#submit-button")
    assert answer.value.status == 202, answer.value.text()
    task_id: str = answer.value.json()["id"]
    return task_id


def card(page: Page, task_id: str) -> Locator:
    return page.locator(f'.card[data-task-id="{task_id}"]')


def wait_loaded(page: Page, selector: str) -> int:
    """Wait until the image is decoded; its natural width."""
    page.wait_for_function(
        "selector => { const img = document.querySelector(selector); return img && img.complete && "
        "img.naturalWidth > 0; }",
        arg=selector,
    )
    width: int = page.eval_on_selector(selector, "img => img.naturalWidth")
    return width


def test_the_page_needs_no_key_and_stays_on_its_origin(stack: Stack) -> None:
    """On a keyed API the page and its assets need no key, but the API still does; nothing outside the
    console's folder is served; the page may call only its own origin."""
    api = ApiServer(dataclasses.replace(stack.config, api_keys=(("t", "k"),)))
    try:
        get = stack.http.get
        redirect = get(f"{api.url}/console")
        assert redirect.status_code == 308 and redirect.headers["Location"].endswith("/console/")
        index = get(f"{api.url}/console/")
        assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/html")
        assert "connect-src 'self'" in index.headers["Content-Security-Policy"]
        assert "form-action 'none'" in index.headers["Content-Security-Policy"]
        for asset, kind in (("console.js", "javascript"), ("console.css", "text/css")):
            response = get(f"{api.url}/console/{asset}")
            assert response.status_code == 200 and kind in response.headers["Content-Type"], asset
        for missing in ("missing.js", "../console.py", "%2e%2e/console.py", "..%2fapp.py"):
            response = get(f"{api.url}/console/{missing}")
            assert response.status_code == 404, missing
            assert response.json()["error"]["code"] == "not_found"
        assert get(f"{api.url}/v1/tasks").status_code == 401
    finally:
        api.stop()


def test_submit_from_the_form_and_follow_the_task_live(page: Page, stack: Stack, tmp_path: Path) -> None:
    """Submit a prompt with an input image; its card appears and turns succeeded without a reload, with a
    thumbnail; its page shows the attempt, the full-size image and a working download link."""
    open_console(page, stack.api_url)
    expect(page.locator("#who")).to_have_text("open server · tenant default")
    expect(page.locator("#signin")).to_be_hidden()
    page.evaluate("window.sameDocument = true")
    input_image = tmp_path / "input.png"
    input_image.write_bytes(base64.b64decode(INPUT_PNG))
    page.set_input_files("#images", str(input_image))
    prompt = f"a red fox in the snow [sim key={uuid.uuid4().hex} delay_ms=1000]"
    with page.expect_request(lambda request: request.url.endswith("/v1/images/generations")) as sent:
        task_id = submit_from_form(page, prompt, ratio="16:9", size="1K")
    body = sent.value.post_data_json
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [{"text": prompt}, {"inline_data": {"mime_type": "image/png", "data": INPUT_PNG}}],
        }
    ]
    assert body["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "1K"}
    assert sent.value.headers["idempotency-key"].startswith("console-")

    status = card(page, task_id).locator(".status")
    expect(status).to_have_text(re.compile("^(queued|running)$"))
    expect(card(page, task_id).locator(".title")).to_have_text(prompt)
    expect(status).to_have_text("succeeded")
    assert wait_loaded(page, f'.card[data-task-id="{task_id}"] .thumb img') > 0
    assert page.evaluate("window.sameDocument") is True, "the list updated in place"
    task = stack.task(task_id)
    output = task["outputs"][0]

    card(page, task_id).click()
    expect(page).to_have_url(re.compile(f"#/tasks/{task_id}$"))
    expect(page.locator("#task-status")).to_have_text("succeeded")
    attempts = page.locator("#attempts tbody tr")
    expect(attempts).to_have_count(1)
    expect(attempts.nth(0).locator("td")).to_have_text(
        ["1", re.compile("."), re.compile("."), "succeeded", "200", "—", re.compile(r"\d")]
    )
    assert wait_loaded(page, "#outputs img.full") == output["width"], "the full-size image"
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#webhook-none")).to_be_visible()
    expect(page.locator("#outputs figcaption")).to_contain_text(f"{output['width']}×{output['height']}")
    download = page.locator("#outputs a.download").get_attribute("href")
    assert download is not None
    image = stack.http.get(download)
    assert image.status_code == 200 and hashlib.sha256(image.content).hexdigest() == output["sha256"]
    if SCREENSHOT:
        save_screenshot(page, stack, task_id, Path(SCREENSHOT))


def save_screenshot(page: Page, stack: Stack, task_id: str, path: Path) -> None:
    """The list with thumbnails (after a few more tasks of other shapes) beside the task's page, reduced to a
    small palette PNG."""
    for ratio, words in (("1:1", "a lighthouse at dusk"), ("9:16", "a tall cactus"), ("3:2", "a red barn")):
        body = with_directive(delay_ms="300")
        body["contents"][0]["parts"] = [body["contents"][0]["parts"][0], {"text": words}]
        body["generationConfig"]["imageConfig"]["aspectRatio"] = ratio
        body["metadata"] = {"prompt": words}
        stack.run(body)
    task_page = page.screenshot(full_page=True)
    page.goto(f"{stack.api_url}/console/#/")
    expect(page.locator(".card img").first).to_be_visible()
    # decoded, then two frames for the painting (a decoded image can still be missing from the next frame)
    page.evaluate(
        "Promise.all([...document.querySelectorAll('.card img')].map(img => img.decode())).then(() => new "
        "Promise(done => requestAnimationFrame(() => requestAnimationFrame(done))))"
    )
    page.mouse.move(0, 0)
    bottom = page.locator("main").bounding_box()
    assert bottom is not None
    listing = page.screenshot(clip={"x": 0, "y": 0, "width": 1280, "height": bottom["y"] + bottom["height"]})
    shots = [Image.open(io.BytesIO(shot)).convert("RGB") for shot in (listing, task_page)]
    shots = [
        shot.resize((shot.width * 3 // 5, shot.height * 3 // 5), Image.Resampling.LANCZOS) for shot in shots
    ]
    height = max(shot.height for shot in shots)
    combined = Image.new("RGB", (sum(shot.width for shot in shots) + 12, height), (200, 204, 210))
    combined.paste(shots[0], (0, 0))
    combined.paste(shots[1], (shots[0].width + 12, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    combined.quantize(colors=64).save(path, optimize=True)


def test_cancel_a_slow_task_from_its_page(page: Page, stack: Stack) -> None:
    open_console(page, stack.api_url)
    task_id = submit_from_form(page, f"a slow one [sim key={uuid.uuid4().hex} delay_ms=5000]")
    page.click("#notice a")  # "Submitted task …" leads to its page
    expect(page).to_have_url(re.compile(f"#/tasks/{task_id}$"))
    expect(page.locator("#task-status")).to_have_text(re.compile("^(queued|running)$"))
    expect(page.locator("#cancel")).to_be_enabled()
    page.click("#cancel")
    expect(page.locator("#task-status")).to_have_text("canceled")
    expect(page.locator("#notice")).to_have_text(f"Task {task_id} canceled.")
    expect(page.locator("#cancel")).to_be_disabled()
    assert stack.task(task_id)["status"] == "canceled"
    expect(page.locator("#error")).to_be_hidden()


def test_webhook_log_and_redeliver(page: Page, stack: Stack) -> None:
    """A task submitted with a webhook URL: its page shows the delivery, and Redeliver sends the event again
    (the same webhook-id), which the log shows too."""
    receiver = Receiver(stack.env["WEBHOOK_SIGNING_SECRET"])
    try:
        path = f"/hooks/{uuid.uuid4().hex[:12]}"
        open_console(page, stack.api_url)
        page.fill("#webhook-url", receiver.url(path))
        task_id = submit_from_form(page, "a heron at the shore")
        page.click("#notice a")
        expect(page.locator("#task-status")).to_have_text("succeeded")
        expect(page.locator("#webhook-url-shown")).to_have_text(receiver.url(path))
        rows = page.locator("#deliveries tbody tr")
        expect(rows).to_have_count(1)
        expect(rows.nth(0).locator("td")).to_have_text(
            ["task.succeeded", "1", re.compile("."), "HTTP 200", re.compile(r"\d"), "delivered", "—"]
        )
        page.click("#redeliver")
        expect(page.locator("#notice")).to_contain_text("task.succeeded")
        expect(rows).to_have_count(2)
        expect(rows.nth(1).locator("td").nth(5)).to_have_text("delivered")
        first, again = receiver.wait_for(path, 2)
        assert first.webhook_id == again.webhook_id == f"msg_{task_id}_succeeded"
    finally:
        receiver.stop()


def test_filter_by_status(page: Page, stack: Stack) -> None:
    succeeded = stack.run(seed_body())["id"]
    failed = stack.run(with_directive(script="400"))["id"]
    canceled = stack.submit(with_directive(delay_ms="5000")).json()["id"]
    assert stack.http.post(f"{stack.api_url}/v1/tasks/{canceled}/cancel").status_code == 200
    open_console(page, stack.api_url)
    for task_id in (succeeded, failed, canceled):
        expect(card(page, task_id)).to_be_visible()
    expect(card(page, failed)).to_contain_text("upstream_rejected")

    for status, shown, left_out in (
        ("failed", failed, (succeeded, canceled)),
        ("canceled", canceled, (succeeded, failed)),
        ("succeeded", succeeded, (failed, canceled)),
    ):
        with page.expect_request(lambda request, s=status: f"status={s}" in request.url):  # type: ignore[misc]
            page.click(f'#filters a[data-status="{status}"]')
        expect(page).to_have_url(re.compile(rf"#/\?status={status}$"))
        expect(page.locator(f'#filters a[data-status="{status}"]')).to_have_attribute("aria-current", "page")
        expect(card(page, shown)).to_be_visible()
        for task_id in left_out:
            expect(card(page, task_id)).to_have_count(0)
        expect(page.locator(".card").filter(has_not=page.locator(f".status-{status}"))).to_have_count(0)

    page.click('#filters a[data-status=""]')
    for task_id in (succeeded, failed, canceled):
        expect(card(page, task_id)).to_be_visible()


def test_the_api_errors_are_shown(page: Page, stack: Stack) -> None:
    open_console(page, stack.api_url)
    page.fill("#model", "not a model!")
    page.fill("#prompt", "a red fox")
    page.click("#submit-button")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_have_attribute("data-code", "invalid_field")
    expect(page.locator("#error-text")).to_contain_text("(field: model) [HTTP 400]")
    page.goto(f"{stack.api_url}/console/#/tasks/{uuid.uuid4()}")
    expect(page.locator("#error")).to_have_attribute("data-code", "not_found")


def test_a_lost_answer_is_sent_again_with_its_key(page: Page, stack: Stack) -> None:
    """The API makes the task but its answer is lost: submitting the same form again reuses the
    Idempotency-Key, and the API answers with that task instead of making another one."""
    made: list[str] = []

    def lose_the_answer(route: Route) -> None:
        made.append(route.fetch().json()["id"])
        route.abort()

    open_console(page, stack.api_url)
    page.route("**/v1/images/generations", lose_the_answer, times=1)
    page.fill("#prompt", "an answer that gets lost")
    page.click("#submit-button")
    expect(page.locator("#error")).to_have_attribute("data-code", "network_error")
    expect(page.locator("#prompt")).to_have_value("an answer that gets lost")
    with page.expect_response(lambda response: response.url.endswith("/v1/images/generations")) as answer:
        page.click("#submit-button")
    assert answer.value.headers.get("idempotent-replayed") == "true"
    assert answer.value.json()["id"] == made[0]
    expect(page.locator("#error")).to_be_hidden()


def test_sign_in_with_a_key(page: Page, stack: Stack) -> None:
    """A keyed API: the page asks for a key; a wrong one shows the API's 401 and is not kept; the right one
    shows the tenant's tasks only, and stays for the tab (a reload) until signing out."""
    api = ApiServer(dataclasses.replace(stack.config, api_keys=(("t", "k"),)))
    try:
        mine = stack.http.post(
            f"{api.url}/v1/images/generations", json=seed_body(), headers={"Authorization": "Bearer k"}
        ).json()["id"]
        someone_elses = stack.run(seed_body())["id"]  # the open stack's tenant, default
        open_console(page, api.url)
        expect(page.locator("#signin")).to_be_visible()
        expect(page.locator("#list-view")).to_be_hidden()

        page.fill("#api-key", "wrong")
        page.click('#signin-form button[type="submit"]')
        expect(page.locator("#error")).to_have_attribute("data-code", "unauthorized")
        expect(page.locator("#error-text")).to_contain_text("[HTTP 401]")
        expect(page.locator("#signin")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0

        page.fill("#api-key", "k")
        page.click('#signin-form button[type="submit"]')
        expect(page.locator("#list-view")).to_be_visible()
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#who")).to_have_text("tenant t")
        expect(card(page, mine)).to_be_visible()
        expect(card(page, someone_elses)).to_have_count(0)
        assert page.evaluate("sessionStorage.getItem('imagegen.apiKey')") == "k"

        page.reload()
        expect(card(page, mine)).to_be_visible()
        page.click("#sign-out")
        expect(page.locator("#signin")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0
    finally:
        api.stop()
