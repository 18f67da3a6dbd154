"""The demo Qwen3-VL sees: its int8hu bundle names the colour and the shape of pictures it never saw.

Pictures come from `lmbundle.demo.draw_scene` with a seed the training never used (training draws with
random.Random(1235), its own check with 99): one of red/green/blue/yellow x circle/square/triangle, any
position and size, on a plain background of another colour, at sizes 96..512 pixels wide and aspect
ratios 1:2..2:1. Each is asked "What is in the image?" through the bundle's own path (stretch to the
fixed 128 x 128 square, normalize, patchify, encoder, extension-id image slots, DeepStack).
Torch backend: 50 pictures, colour and shape each >= 90 %. Core AI backend: a few pictures, the same
tokens as the torch backend and right answers.
"""

from __future__ import annotations

import gc
import random
import warnings
from pathlib import Path

import pytest

from lmbundle.convert.convert import convert
from lmbundle.demo import COLOURS, SHAPES, draw_scene, named
from lmbundle.engine.engine import Engine
from lmbundle.engine.request import Request

DEMO = Path(__file__).resolve().parents[1] / "lmbundle" / "data" / "demo" / "qwen3vl-tiny"
QUESTION = "What is in the image?"
SEED = 2026  # not a training seed
PICTURES, TARGET = 50, 0.9

pytestmark = pytest.mark.usefixtures("one_thread")


def _coreai_present() -> bool:
    try:
        with warnings.catch_warnings():  # coreai-torch: "only validated with torch<=..."
            warnings.simplefilter("ignore")
            import coreai.runtime  # noqa: F401
            import coreai_torch  # noqa: F401
    except ImportError:
        return False
    return True


def _convert(tmp_path_factory, backend: str) -> Path:
    return convert(str(DEMO), tmp_path_factory.mktemp("demo-vlm") / "int8hu", quant="int8hu", backend=backend,
                   max_context=256, log=None)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _convert(tmp_path_factory, "torch")


def _pictures(count: int, seed: int = SEED):
    rng = random.Random(seed)
    return [draw_scene(rng) for _ in range(count)]


def _ask(engine: Engine, image, question: str = QUESTION) -> tuple[list[int], str]:
    ids = engine.chat_ids([{"role": "user", "content": [{"type": "image", "image": image},
                                                        {"type": "text", "text": question}]}])
    done = engine.complete(Request(ids, max_tokens=10))
    return done.tokens, done.text


def _accuracy(engine: Engine, pictures) -> tuple[float, float, list[str]]:
    colour = shape = 0
    wrong = []
    for image, scene in pictures:
        _, answer = _ask(engine, image)
        colour_ok = named(answer, COLOURS) == [scene.colour]
        shape_ok = named(answer, SHAPES) == [scene.shape]
        colour, shape = colour + colour_ok, shape + shape_ok
        if not (colour_ok and shape_ok):
            wrong.append(f"{scene.colour} {scene.shape} {scene.size} on {scene.background}: {answer!r}")
    return colour / len(pictures), shape / len(pictures), wrong


def test_colour_and_shape_accuracy_torch(bundle):
    engine = Engine(bundle, backend="torch", device="cpu")
    colour, shape, wrong = _accuracy(engine, _pictures(PICTURES))
    print(f"\ntorch backend, {PICTURES} pictures: colour {colour:.0%}, shape {shape:.0%}; wrong: {wrong}")
    assert colour >= TARGET and shape >= TARGET, (colour, shape, wrong)


def test_answers_follow_the_question(bundle):
    """The colour, shape and side questions on 20 other pictures get the short answers taught, and right."""
    engine = Engine(bundle, backend="torch", device="cpu")
    right = {"colour": 0, "shape": 0, "side": 0}
    wrong = []
    pictures = _pictures(20, SEED + 1)
    for image, scene in pictures:
        for key, question, expected in (("colour", "What colour is the shape?", f"{scene.colour.capitalize()}."),
                                        ("shape", "What shape is it?", f"A {scene.shape}."),
                                        ("side", "Is it on the left or the right?", f"On the {scene.side}.")):
            answer = _ask(engine, image, question)[1]
            right[key] += answer == expected
            if answer != expected:
                wrong.append(f"{question} {expected!r} <- {answer!r} ({scene.size}, {scene.background})")
    print(f"\ntorch backend, {len(pictures)} pictures, by question: {right}; wrong: {wrong}")
    assert all(count >= 0.85 * len(pictures) for count in right.values()), (right, wrong)


@pytest.mark.skipif(not _coreai_present(), reason="Core AI (coreai-core, coreai-torch) not installed")
def test_core_ai_backend_answers_the_same(tmp_path_factory):
    """(The engine is freed, not closed, before the test ends: like the demo and the CLI.)"""
    bundle = _convert(tmp_path_factory, "all")
    torch_engine = Engine(bundle, backend="torch", device="cpu")
    coreai = Engine(bundle, backend="coreai")
    pictures = _pictures(4, SEED + 2)
    for image, scene in pictures:
        ours, answer = _ask(coreai, image)
        assert ours == _ask(torch_engine, image)[0], answer
    colour, shape, wrong = _accuracy(coreai, pictures)
    print(f"\nCore AI backend, {len(pictures)} pictures: colour {colour:.0%}, shape {shape:.0%}; wrong: {wrong}")
    del coreai
    gc.collect()  # freed while its event loop runs; left to interpreter exit, the Core AI runtime can abort
    assert colour >= 0.75 and shape >= 0.75, wrong
