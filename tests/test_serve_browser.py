"""The chat page in a real headless Chromium (Debian's, driven by Python playwright).

Types a message, watches the answer stream in, checks it against the engine's own greedy output,
stops a long answer with the Stop button, and saves a screenshot to tests/artifacts/.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from lmbundle.convert.convert import convert
from lmbundle.engine.engine import Engine
from tests.test_serve import reference, request, start_server, stop_server

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = "/usr/bin/chromium"
if not shutil.which(CHROMIUM):
    pytest.skip(f"no {CHROMIUM} (Debian: apt-get install -y chromium)", allow_module_level=True)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "artifacts"
MAX_CONTEXT = 1024


@pytest.fixture(scope="module")
def bundle(tiny_qwen35, tmp_path_factory):
    return convert(str(tiny_qwen35), tmp_path_factory.mktemp("browser") / "tiny", quant="fp16", backend="torch",
                   max_context=MAX_CONTEXT, log=None)


@pytest.fixture(scope="module")
def server(bundle):
    proc, host = start_server(bundle)
    yield host
    stop_server(proc)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(f"http://{server}/")
        yield page
        browser.close()


def set_field(page, selector: str, value: str) -> None:
    """Fill a field of the Settings panel (opening it first)."""
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    page.locator(selector).fill(value)


def close_settings(page) -> None:
    if page.locator("#settings").is_visible():
        page.click("#settings-toggle")


def test_chat_streams_the_engines_answer_and_stops(page, server, bundle):
    engine = Engine(bundle, backend="torch", device="cpu")
    sync_api.expect(page.locator("#model-name")).to_have_text(engine.name)
    assert page.locator("#attach").is_hidden()  # a text bundle: no image upload
    set_field(page, "#temperature", "0")
    set_field(page, "#max-tokens", "24")
    close_settings(page)
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(
            document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    }""")

    question = "The quick brown fox"
    page.fill("#prompt", question)
    page.keyboard.press("Enter")
    answer = page.locator(".turn.assistant").last
    sync_api.expect(answer.locator(".meta")).to_contain_text("tok/s", timeout=30_000)
    expected, n, _ = reference(engine, engine.chat_ids([{"role": "user", "content": question}]), 24)
    assert answer.locator(".bubble").evaluate("node => node.textContent") == expected
    assert f"{n} tokens" in answer.locator(".meta").inner_text()
    assert page.evaluate("window.updates") > 3  # pieces arrived one by one, not as one block

    stopped_before = request("GET", server, "/health")[1]["stopped"]
    set_field(page, "#max-tokens", "800")
    page.fill("#prompt", "Tell me a long story about a little cat")
    page.keyboard.press("Enter")
    streaming = page.locator(".turn.assistant.streaming .bubble")
    sync_api.expect(streaming).not_to_have_text("", timeout=30_000)  # the first pieces are in
    last = page.locator(".turn.assistant").last
    try:
        page.click("#stop", timeout=5_000)
    except sync_api.Error:
        raise AssertionError(f"the answer ended before Stop: {last.inner_text()!r}") from None
    sync_api.expect(page.locator(".turn.assistant").last.locator(".meta")).to_have_text("stopped")
    sync_api.expect(page.locator("#send")).to_be_visible()
    deadline = time.monotonic() + 10
    while request("GET", server, "/health")[1]["stopped"] == stopped_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request("GET", server, "/health")[1]["stopped"] == stopped_before + 1  # the server stopped decoding

    set_field(page, "#max-tokens", "24")
    page.fill("#prompt", "One more, please")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator(".turn.assistant").last.locator(".meta")).to_contain_text("tok/s",
                                                                                            timeout=30_000)
    close_settings(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_chat.png"))


def test_server_errors_show_in_the_conversation(page):
    set_field(page, "#max-tokens", str(MAX_CONTEXT + 1))
    page.fill("#prompt", "Too much")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator(".turn.assistant").last.locator(".bubble.error")).to_contain_text(
        "context too long")
    page.screenshot(path=str(ARTIFACTS / "serve_chat_error.png"))
