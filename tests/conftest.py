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


HOST_SHAPES = ("base", "deep_pattern", "qwen3_vl", "qwen3_5_vision")  # text x2 (GDN layouts), image-text x2


@pytest.fixture(scope="session")
def host_bundles(tmp_path_factory):
    """Fresh int8hu bundles with both backends (Core AI where it installs), one per shape the hosts must
    take: two tiny Qwen3.5 text layouts, a tiny Qwen3-VL (DeepStack) and a tiny Qwen3.5 with a vision
    tower. Converted once for the session (each export is ~10 s on the reference runtime)."""
    from lmbundle.convert.convert import convert
    from tests.test_vlm_e2e import _make_checkpoint

    root = tmp_path_factory.mktemp("host-bundles")
    bundles = {}
    for shape in HOST_SHAPES:
        ckpt = root / f"{shape}-ckpt"
        if shape in checkpoints.TINY_CONFIGS:
            checkpoints.make_qwen35_with_tokenizer(ckpt, **checkpoints.TINY_CONFIGS[shape])
        else:
            _make_checkpoint(shape.removesuffix("_vision"), ckpt)
        bundles[shape] = convert(str(ckpt), root / shape, quant="int8hu", backend="all", max_context=256, log=None)
    return bundles
