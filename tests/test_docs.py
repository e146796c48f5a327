"""``/docs``: Swagger UI served by the API itself, offline: the page and every file it loads come over
HTTP from the API, the HTML names no other origin, its Content-Security-Policy lets a browser load
nothing from elsewhere, and neither the page nor its files need a key."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.stack import ApiServer, Stack


class _Page(HTMLParser):
    """The URLs a page loads (``src``, ``href``) and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]
        self._in_script = tag == "script" and not dict(attrs).get("src")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


@pytest.fixture(scope="module")
def keyed(stack: Stack) -> Iterator[str]:
    """An API on the stack that requires keys: the docs must still need none."""
    api = ApiServer(dataclasses.replace(stack.config, api_keys=(("default", "docs-test-key"),)))
    yield api.url
    api.stop()


def read(base: str) -> tuple[httpx.Response, _Page]:
    response = httpx.get(f"{base}/docs", timeout=10)
    page = _Page()
    page.feed(response.text)
    return response, page


def test_the_page_loads_only_from_the_api(stack: Stack, keyed: str) -> None:
    for base in (stack.api_url, keyed):
        response, page = read(base)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?:|//", response.text.replace("<!DOCTYPE html>", "")), "an external URL"
        assert all(not urlsplit(url).scheme and not urlsplit(url).netloc for url in page.urls), page.urls
        loaded = {url: httpx.get(urljoin(f"{base}/docs", url), timeout=10) for url in page.urls}
        assert {url: answer.status_code for url, answer in loaded.items()} == dict.fromkeys(page.urls, 200)
        types = {urlsplit(url).path.rsplit(".", 1)[-1]: loaded[url].headers["content-type"] for url in loaded}
        assert types["js"].startswith("text/javascript") and types["css"].startswith("text/css"), types
        assert any(b"SwaggerUIBundle" in answer.content for answer in loaded.values())
        # the document the page's script asks for, relative to the page as well: no key either
        [script] = page.scripts
        [document_url] = re.findall(r'url: "([^"]+)"', script)
        document = httpx.get(urljoin(f"{base}/docs", document_url), timeout=10)
        assert document.status_code == 200 and "/docs" in document.json()["paths"]


def test_the_browser_may_load_nothing_from_elsewhere(stack: Stack) -> None:
    """The Content-Security-Policy: this origin only, and the page's own inline script by its hash."""
    response, page = read(stack.api_url)
    directives = response.headers["content-security-policy"].split(";")
    policy = dict(directive.strip().split(" ", 1) for directive in directives)
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    [script] = page.scripts
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert policy["script-src"] == f"'self' 'sha256-{digest}'"
    assert "validatorUrl: null" in script, "Swagger UI would load a badge from its online validator"


def test_a_static_file_is_served_only_from_swagger_uis_files(stack: Stack) -> None:
    assert httpx.get(f"{stack.api_url}/docs/static/../../api/app.py", timeout=10).status_code == 404
    assert httpx.get(f"{stack.api_url}/docs/static/missing.js", timeout=10).status_code == 404


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_a_browser_renders_it_with_every_other_host_unreachable(stack: Stack) -> None:
    """Headless Chromium, every name but the API's address unresolvable: the operations are drawn."""
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--dump-dom",
            f"{stack.api_url}/docs",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    drawn = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {"/v1/images/generations", "/v1/tasks/{task_id}", "/docs"} <= drawn, dom[-2000:]
