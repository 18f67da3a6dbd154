"""The chat page with the demo Qwen3-VL in a real headless Chromium: a drawn picture goes in through the
file picker, and the answer on the page names its colour and its shape. Screenshot:
tests/artifacts/serve_demo_vlm.png.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lmbundle.convert.convert import convert
from lmbundle.demo import COLOURS, SHAPES, draw_scene, named
from tests.chat_page import ARTIFACTS, chat_page, close_settings, finished, last_answer, send, set_field, sync_api

DEMO = Path(__file__).resolve().parents[1] / "lmbundle" / "data" / "demo" / "qwen3vl-tiny"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve):
    bundle = convert(str(DEMO), tmp_path_factory.mktemp("demo-vlm") / "int8hu", quant="int8hu", backend="torch",
                     max_context=512, log=None)
    return serve(bundle)[1]


def test_the_page_names_colour_and_shape_of_a_drawn_picture(server, tmp_path):
    image, scene = draw_scene(random.Random(31), colour="green", shape="triangle", side="right", size=(360, 240))
    path = tmp_path / "green-triangle.png"
    image.save(path)
    with chat_page(server) as page:
        set_field(page, "#temperature", "0")
        set_field(page, "#max-tokens", "16")
        close_settings(page)
        page.set_input_files("#file-picker", str(path))
        sync_api.expect(page.locator(".thumb")).to_have_count(1)
        send(page, "What is in the image?")
        finished(page)
        sync_api.expect(page.locator(".turn.user img")).to_have_count(1)
        answer = last_answer(page).locator(".bubble").evaluate("node => node.textContent")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve_demo_vlm.png"))
    assert named(answer, COLOURS) == [scene.colour] and named(answer, SHAPES) == [scene.shape], answer
