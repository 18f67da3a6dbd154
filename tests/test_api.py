"""The Python API (`lmbundle.load` -> Model): its answers are the engine's, streaming joins to the same text,
a checkpoint folder is converted once into the cache, and `import lmbundle` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lmbundle
from lmbundle.convert.convert import convert
from lmbundle.engine.engine import Engine
from lmbundle.engine.request import Request
from lmbundle.engine.sampling import Sampling
from lmbundle.errors import LmbundleError

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Once upon a time there was a little cat"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def bundle(tiny_qwen35, tmp_path_factory):
    return convert(str(tiny_qwen35), tmp_path_factory.mktemp("api") / "fp16", quant="fp16", backend="torch", log=None)


@pytest.fixture(scope="module")
def model(bundle):
    with lmbundle.load(bundle, backend="torch", device="cpu") as model:
        yield model


@pytest.fixture(scope="module")
def engine(bundle):
    return Engine(bundle, backend="torch", device="cpu", prefill_chunk=256)


def test_generate_and_stream_are_the_engines_answer(model, engine):
    expected = engine.complete(Request(PROMPT, max_tokens=16)).text
    assert expected and model.generate(PROMPT, max_tokens=16) == expected
    stream = model.stream(PROMPT, max_tokens=16)
    pieces = list(stream)
    assert "".join(pieces) == expected and len(pieces) > 1
    assert stream.finish_reason in ("stop", "length") and stream.stats.generated_tokens > 0
    ids = engine.encode(PROMPT)
    assert model.generate(ids, max_tokens=16) == expected  # token ids as the prompt
    sampled = {"temperature": 0.9, "top_p": 0.9, "seed": 5, "max_tokens": 12}
    assert model.generate(PROMPT, **sampled) == engine.complete(
        Request(PROMPT, max_tokens=12, sampling=Sampling(temperature=0.9, top_p=0.9, seed=5))).text


def test_chat_and_stop_strings(model, engine):
    expected = engine.complete(Request(messages=MESSAGES, max_tokens=24)).text
    assert model.chat(MESSAGES, max_tokens=24) == expected == "".join(model.stream_chat(MESSAGES, max_tokens=24))
    visible = expected.replace("\ufffd", "")
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    assert model.chat(MESSAGES, max_tokens=24, stop=stop) == expected[: expected.find(stop)]
    with pytest.raises(LmbundleError, match="no vision encoder"):
        model.chat(MESSAGES, images=["cat.png"])


def test_a_checkpoint_is_converted_once_into_the_cache(tiny_qwen35, tmp_path, monkeypatch, capfd, engine):
    monkeypatch.setenv("LMBUNDLE_CACHE", str(tmp_path))
    first = lmbundle.load(tiny_qwen35, quant="fp16", device="cpu")
    note = capfd.readouterr().err
    assert "is not a bundle: converting it (fp16) into" in note and str(tmp_path / "bundles") in note
    assert first.engine.bundle.path.parent == tmp_path / "bundles"
    again = lmbundle.load(tiny_qwen35, quant="fp16", device="cpu")
    assert "converting" not in capfd.readouterr().err and again.engine.bundle.path == first.engine.bundle.path
    assert again.generate(PROMPT, max_tokens=8) == engine.complete(Request(PROMPT, max_tokens=8)).text
    with pytest.raises(LmbundleError, match="no such bundle folder"):
        lmbundle.load(tmp_path / "missing")


def test_import_lmbundle_is_light():
    code = "import sys, lmbundle; print('torch' in sys.modules, callable(lmbundle.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr
