"""The browser the chat-page tests drive: headless Chromium from the system's packages (`apt-get install chromium`;
.ci/run installs it when missing, as root), through Playwright pointed at that binary — Playwright's own browser
downloads are never used. Without Chromium or Playwright the tests skip, saying how to get them."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """One browser per module, closed with it: Playwright's sync API keeps an event loop running on this thread
    while it is open, and later tests' `asyncio.run` would refuse to start under it."""
    if CHROMIUM is None:
        pytest.skip("the chat-page tests need Chromium: apt-get install chromium (.ci/run installs it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the dev extra's playwright (make install)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()
