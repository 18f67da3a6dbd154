"""Shared fixtures: tiny random checkpoints built with transformers' own classes and save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import checkpoints

if not torch.cuda.is_available():  # the CUDA kernels' tests run in Triton's interpreter (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_device() -> str | None:
    """Where the Triton kernels' tests run: "cuda", else "cpu" in Triton's interpreter, else None (they skip)."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def kernel_tests_need(device: str | None) -> pytest.MarkDecorator:
    """The module mark of the kernels' tests: skip without a device for them, else need Triton."""
    if device is not None:
        pytest.importorskip("triton")
    return pytest.mark.skipif(device is None, reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_qwen35(tmp_path_factory):
    """The default tiny Qwen3.5 text checkpoint (3 GDN + 1 attention layer, untied head)."""
    return checkpoints.make_qwen35_with_tokenizer(
        tmp_path_factory.mktemp("ckpt") / "qwen35", **checkpoints.TINY_CONFIGS["base"]
    )


DEMO_QWEN35 = Path(__file__).resolve().parents[1] / "lmbundle" / "data" / "demo" / "qwen35-tiny"


@pytest.fixture(scope="session")
def demo_bundles(tmp_path_factory):
    """The trained demo model (real margins) as fp16 and int8hu bundles, with .aimodel where Core AI installs."""
    from lmbundle.convert.convert import convert

    root = tmp_path_factory.mktemp("demo")
    return {q: convert(str(DEMO_QWEN35), root / q, quant=q, backend="all", log=None) for q in ("fp16", "int8hu")}


# Fresh-init checkpoints (exactly as transformers initialises them: uniform norms, dt_bias = ones, zero
# biases) of several shapes, tied and untied, text and VLM, each with the quant mode its bundle is made in.
FRESH = {
    "text-untied": (lambda folder: checkpoints.make_qwen35_with_tokenizer(
        folder, fresh=True, **checkpoints.TINY_CONFIGS["base"]), "int8hu"),
    "text-tied": (lambda folder: checkpoints.make_qwen35_with_tokenizer(
        folder, fresh=True, **checkpoints.TINY_CONFIGS["tied_mha"]), "fp16"),
    "vlm": (lambda folder: checkpoints.make_qwen3vl_with_tokenizer(folder, fresh=True), "int8hu"),
}


class FreshBundles:
    """name -> (checkpoint folder, bundle with both graphs, oracle), made on first use (a test worker
    builds only the ones its tests ask for)."""

    def __init__(self, root: Path):
        self.root, self._made = root, {}

    def __getitem__(self, name: str):
        if name not in self._made:
            from lmbundle.convert.convert import convert
            from lmbundle.gates.oracle import Oracle

            make, quant = FRESH[name]
            checkpoint = make(self.root / f"{name}-checkpoint")
            bundle = convert(str(checkpoint), self.root / name, quant=quant, backend="all", max_context=512, log=None)
            self._made[name] = (checkpoint, bundle, Oracle(str(checkpoint)))
        return self._made[name]


@pytest.fixture(scope="session")
def fresh_bundles(tmp_path_factory):
    return FreshBundles(tmp_path_factory.mktemp("fresh"))


@pytest.fixture(scope="session")
def sabotage_models(tiny_qwen35, tmp_path_factory):
    """The tiny random checkpoint and the trained demo model, each with its bundles made on first use."""
    from tests.sabotage import Model

    root = tmp_path_factory.mktemp("sabotage")
    (root / "tiny").mkdir()
    (root / "demo").mkdir()
    return {"tiny": Model(tiny_qwen35, root / "tiny"), "demo": Model(DEMO_QWEN35, root / "demo")}
