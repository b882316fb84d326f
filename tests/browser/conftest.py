"""Headless Chromium (Debian's package, driven by Playwright) against a real LoRA Studio server.

No Playwright browser download: ``/usr/bin/chromium`` is required, and its absence is a test
failure with the command that installs it, not a skip. Every request each page makes is recorded
and checked after the test: the app must never reach beyond 127.0.0.1 (no CDN, fonts, analytics).
Every uncaught script error and every console error of those pages fails the test too: a page
that logs ``Cannot read properties of undefined`` has stopped updating something the artist sees.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from browser.app_server import AppServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LOCAL_HOSTS = {"127.0.0.1"}


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    executable = CHROMIUM if CHROMIUM.is_file() else shutil.which("chromium")
    if executable is None:
        pytest.fail("Headless Chromium is missing: install it with `apt-get install -y chromium` "
                    "(the browser tests drive /usr/bin/chromium; `playwright install` is not used).")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=20_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


class PageSession:
    """Opens pages on the app, each recording every URL it requests."""

    def __init__(self, browser, url: str) -> None:
        self.browser, self.url = browser, url
        self.requests: list[str] = []
        self.page_errors: list[str] = []  # uncaught exceptions and console errors
        self._unloading: set = set()  # pages being reloaded: their aborted connections log errors
        self.contexts: list = []

    def open(self):
        context = self.browser.new_context(viewport={"width": 1400, "height": 1000})
        context.on("request", lambda request: self.requests.append(request.url))
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: self._error(page, f"uncaught: {error}"))
        page.on("console", lambda message: self._error(page, f"console.error: {message.text}")
                if message.type == "error" else None)
        page.set_default_timeout(30_000)
        page.goto(self.url)
        return page

    def reload(self, page) -> None:
        """Reload as the artist does (F5); the old document's streams, cut off, log no error that counts."""
        self._unloading.add(page)
        try:
            page.reload()
        finally:
            self._unloading.discard(page)

    def _error(self, page, text: str) -> None:
        if page not in self._unloading:
            self.page_errors.append(text)

    def outside_requests(self) -> list[str]:
        return [url for url in self.requests
                if urlparse(url).scheme not in ("data", "blob") and urlparse(url).hostname not in LOCAL_HOSTS]

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(chromium, app_server: AppServer) -> Iterator[PageSession]:
    session = PageSession(chromium, app_server.url)
    yield session
    session.close()
    outside = session.outside_requests()
    assert session.requests, "the page made no requests at all: was it loaded?"
    assert not outside, f"the page requested URLs outside 127.0.0.1: {outside}"
    assert not session.page_errors, f"the page reported errors: {session.page_errors}"
