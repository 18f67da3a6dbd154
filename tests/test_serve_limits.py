"""Image limits of `lmbundle serve` on a tiny Qwen3.5 VLM bundle: every image of a request is counted and
its bytes and declared pixel size checked before any is decoded; images are then decoded one at a time
and reduced to the encoder's input, so memory goes back to where it was."""

from __future__ import annotations

import base64
import io
import os
import time

import openai
import psutil
import pytest
from PIL import Image

from lmbundle.convert.convert import convert
from tests.conftest import API_KEY

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one torch thread for tiny models


@pytest.fixture(scope="module")
def server(tiny_vlm, tmp_path_factory, serve):
    bundle = convert(str(tiny_vlm), tmp_path_factory.mktemp("vlm-serve") / "fp16", quant="fp16", backend="torch",
                     max_context=2048, max_images=4, log=None)
    return serve(bundle, "--api-key", API_KEY, "--timeout", "120")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://{server[1]}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def images_message(urls: list[str]) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": "What is this?"}]}]


def error_of(client, messages) -> dict:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=None, messages=messages, max_tokens=2)
    return err.value.body


def test_bad_images_are_400(client):
    garbage = "data:image/png;base64," + base64.b64encode(b"certainly not a png" * 10).decode()
    assert "not an image" in error_of(client, images_message([garbage]))["message"]
    png = base64.b64decode(png_url(Image.new("RGB", (64, 64), "red")).split(",")[1])
    truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    assert "truncated" in error_of(client, images_message([truncated]))["message"]
    huge = png_url(Image.new("1", (8000, 7000)))  # 56 megapixels, a few kB of PNG
    assert "megapixel" in error_of(client, images_message([huge]))["message"]
    big = "data:image/png;base64," + base64.b64encode(os.urandom(21 * 2**20)).decode()
    assert "20 MB" in error_of(client, images_message([big]))["message"]
    assert "fetch" in error_of(client, images_message(["https://example.com/cat.png"]))["message"]
    # one bad image after a good one: refused before the good one is decoded
    good = png_url(Image.new("RGB", (32, 32), "blue"))
    assert "megapixel" in error_of(client, images_message([good, huge]))["message"]


def test_image_bomb_is_refused_before_decoding_and_memory_comes_back(server, client):
    """The probe: 16 PNGs of 7000 x 7000 (49 megapixels each, under the 50 MP limit) in one request, three
    times. Before: decoded one by one before the 4-image limit was checked (400 after 30 s, RSS 0.5 ->
    5.2 GB and kept). Now: 400 at once; and 4 such images (the limit) are decoded one at a time."""
    proc, _ = server
    process = psutil.Process(proc.pid)
    bomb = png_url(Image.new("RGB", (7000, 7000), "white"))
    client.chat.completions.create(model=None, messages=images_message([png_url(Image.new("RGB", (32, 32)))]),
                                   max_tokens=1)  # steady state: the encoder has run once
    before = process.memory_info().rss
    start = time.monotonic()
    for _ in range(3):
        body = error_of(client, images_message([bomb] * 16))
        assert "16 images" in body["message"] and "at most 4" in body["message"]
    refused_in = time.monotonic() - start
    after_refused = process.memory_info().rss
    start = time.monotonic()
    out = client.chat.completions.create(model=None, messages=images_message([bomb] * 4), max_tokens=1)
    accepted_in = time.monotonic() - start
    after = process.memory_info().rss
    print(f"\n3 x 16 PNGs of 7000x7000 ({len(bomb) * 16 / 2**20:.1f} MB of base64 each): HTTP 400 in "
          f"{refused_in:.2f} s, RSS {before / 2**20:.0f} -> {after_refused / 2**20:.0f} MB; 4 of them: HTTP 200 in "
          f"{accepted_in:.1f} s, RSS -> {after / 2**20:.0f} MB")
    assert refused_in < 5 and after_refused - before < 50 * 2**20
    assert out.usage.prompt_tokens > 4 * 196
    assert after - before < 200 * 2**20  # one 196 MB image decoded at a time and given back (not 4 x 196 MB kept)
