"""The web chat page in a headless Chromium (Debian's, driven by Python playwright): what the browser tests
share. Importing it skips the importing test module where playwright or Chromium is missing."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = "/usr/bin/chromium"
if not shutil.which(CHROMIUM):
    pytest.skip(f"no {CHROMIUM} (Debian: apt-get install -y chromium)", allow_module_level=True)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots


@contextlib.contextmanager
def chat_page(host: str):
    """The chat page of the server at `host`, open in a fresh browser."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"http://{host}/")
            yield page
        finally:
            browser.close()


def set_field(page, selector: str, value: str) -> None:
    """Fill a field of the Settings panel (opening it first)."""
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    page.locator(selector).fill(value)


def close_settings(page) -> None:
    if page.locator("#settings").is_visible():
        page.click("#settings-toggle")


def last_answer(page):
    return page.locator(".turn.assistant").last


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.keyboard.press("Enter")


def finished(page):
    sync_api.expect(last_answer(page).locator(".meta")).to_contain_text("tok/s", timeout=30_000)
