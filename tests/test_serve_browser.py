"""The chat page in a real headless Chromium (Debian's, driven by Python playwright), on a tiny
Qwen3.5-with-vision bundle.

Types a message and watches the answer stream in, checked against the engine's own greedy output;
stops a long answer with the Stop button (the server stops decoding); attaches an image with the
picker and by drag and drop, and checks that answer against the engine on the same image; shows a
server error in the conversation. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from lmbundle.convert.convert import convert
from lmbundle.engine.request import Request
from tests.chat_page import ARTIFACTS, chat_page, close_settings, finished, last_answer, send, set_field, sync_api
from tests.conftest import http_request

MAX_CONTEXT = 8192  # an image is 196 tokens; a long answer takes seconds, so Stop comes first


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle(tiny_vlm, tmp_path_factory):
    return convert(str(tiny_vlm), tmp_path_factory.mktemp("browser") / "tiny-vlm", quant="fp16", backend="torch",
                   max_context=MAX_CONTEXT, log=None)


@pytest.fixture(scope="module")
def server(bundle, serve):
    return serve(bundle)[1]


@pytest.fixture(scope="module")
def page(server):
    with chat_page(server) as page:
        yield page


def reference(engine, ids: list[int], max_tokens: int) -> tuple[str, int]:
    """The engine's own greedy answer to the same prompt: its text and token count."""
    done = engine.complete(Request(ids, max_tokens=max_tokens))
    return done.text, done.stats.generated_tokens


def test_chat_streams_the_engines_answer_and_stops(page, server, engine):
    sync_api.expect(page.locator("#model-name")).to_have_text(engine.name)
    set_field(page, "#temperature", "0")
    set_field(page, "#max-tokens", "24")
    close_settings(page)
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(
            document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    }""")

    question = "A cat sat on the mat"
    send(page, question)
    finished(page)
    expected, n = reference(engine, engine.chat_ids([{"role": "user", "content": question}]), 24)
    assert last_answer(page).locator(".bubble").evaluate("node => node.textContent") == expected
    prompt_tokens = len(engine.chat_ids([{"role": "user", "content": question}]))
    assert f"{prompt_tokens} prompt + {n} tokens" in last_answer(page).locator(".meta").inner_text()
    assert page.evaluate("window.updates") > 3  # pieces arrived one by one, not as one block

    stopped_before = http_request("GET", server, "/health")[1]["stopped"]
    set_field(page, "#max-tokens", str(MAX_CONTEXT // 2))  # seconds of decoding: Stop comes first
    close_settings(page)
    send(page, "Tell me a long story about a little cat")
    sync_api.expect(page.locator(".turn.assistant.streaming .bubble")).not_to_have_text("", timeout=30_000)
    try:
        page.click("#stop", timeout=5_000)
    except sync_api.Error:
        raise AssertionError(f"the answer ended before Stop: {last_answer(page).inner_text()!r}") from None
    sync_api.expect(last_answer(page).locator(".meta")).to_have_text("stopped")
    sync_api.expect(page.locator("#send")).to_be_visible()
    deadline = time.monotonic() + 10
    while http_request("GET", server, "/health")[1]["stopped"] == stopped_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http_request("GET", server, "/health")[1]["stopped"] == stopped_before + 1  # the server stopped decoding

    set_field(page, "#max-tokens", "24")
    close_settings(page)
    send(page, "One more, please")
    finished(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_chat.png"))


def test_image_by_picker_and_drop_answers_like_the_engine(page, engine, tmp_path):
    assert engine.is_vlm
    path = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    pixels[40:140, 60:180] = (230, 120, 40)  # an orange block, so the thumbnail shows something
    Image.fromarray(pixels).save(path)
    page.click("#new-chat")
    set_field(page, "#max-tokens", "16")
    close_settings(page)
    assert page.locator("#attach").is_visible()  # a vision bundle offers image upload

    page.set_input_files("#file-picker", str(path))
    sync_api.expect(page.locator(".thumb")).to_have_count(1)
    drop = page.evaluate_handle("""(url) => {  // the thumbnail's data: URL as a file (the page's CSP allows no fetch of it)
        const bytes = Uint8Array.from(atob(url.split(",")[1]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        return data;
    }""", page.locator(".thumb img").get_attribute("src"))
    page.dispatch_event("#composer", "dragenter", {"dataTransfer": drop})
    sync_api.expect(page.locator("#drop-hint")).to_be_visible()
    page.dispatch_event("#composer", "drop", {"dataTransfer": drop})
    sync_api.expect(page.locator(".thumb")).to_have_count(2)
    sync_api.expect(page.locator("#drop-hint")).to_be_hidden()
    page.locator(".thumb button").last.click()  # remove the dropped copy again
    sync_api.expect(page.locator(".thumb")).to_have_count(1)

    question = "What is in this picture?"
    send(page, question)
    finished(page)
    sync_api.expect(page.locator(".turn.user img")).to_have_count(1)
    image = Image.open(path)
    ids = engine.chat_ids([{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": question}]}])
    expected, n = reference(engine, ids, 16)
    assert last_answer(page).locator(".bubble").evaluate("node => node.textContent") == expected
    assert f"{len(ids)} prompt + {n} tokens" in last_answer(page).locator(".meta").inner_text()  # 196 image tokens
    page.screenshot(path=str(ARTIFACTS / "serve_chat_image.png"))


def test_server_errors_show_in_the_conversation(page):
    set_field(page, "#max-tokens", str(MAX_CONTEXT + 1))
    send(page, "Too much")
    sync_api.expect(last_answer(page).locator(".bubble.error")).to_contain_text("context too long")
    page.screenshot(path=str(ARTIFACTS / "serve_chat_error.png"))


def test_text_bundle_hides_image_upload(page):
    """What the page does with /api/info of a text-only bundle (answered here by the browser)."""
    info = http_request("GET", page.url.split("/")[2], "/api/info")[1]
    page.route("**/api/info", lambda route: route.fulfill(json={**info, "vision": False}))
    page.reload()
    sync_api.expect(page.locator("#model-name")).to_have_text(info["id"])
    assert page.locator("#attach").is_hidden()
    page.unroute("**/api/info")


def test_non_image_files_are_refused_at_attach_time(page, tmp_path):
    """A text file, a text file named .png (the browser says image/png) and an SVG: none is attached, each
    says why at once; nothing is sent."""
    page.click("#new-chat")
    (tmp_path / "notes.txt").write_text("just text")
    (tmp_path / "fake.png").write_text("not a png at all")
    (tmp_path / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "/v1/" in r.url else None)
    for name, why in (("notes.txt", "not an image"), ("fake.png", "does not decode"), ("drawing.svg", "not an image")):
        page.evaluate("setStatus('')")
        page.set_input_files("#file-picker", str(tmp_path / name))
        sync_api.expect(page.locator("#status")).to_contain_text(name)
        sync_api.expect(page.locator("#status")).to_contain_text(why)
        sync_api.expect(page.locator(".thumb")).to_have_count(0)
    assert sent == []


def test_failed_message_stays_in_the_next_request(page):
    """After an error the failed message is still shown, and so it is also in the conversation sent next."""
    page.click("#new-chat")
    set_field(page, "#max-tokens", str(MAX_CONTEXT + 1))
    close_settings(page)
    send(page, "This one fails")
    sync_api.expect(last_answer(page).locator(".bubble.error")).to_contain_text("context too long")
    set_field(page, "#max-tokens", "4")
    close_settings(page)
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "This one works")
    messages = sent.value.post_data_json["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["This one fails", "This one works"]
    finished(page)


def test_settings_say_where_the_key_is_kept(page):
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    sync_api.expect(page.locator("#key-note")).to_contain_text("local storage")
    close_settings(page)
