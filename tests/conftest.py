"""Shared fixtures: tiny random checkpoints built with transformers' own classes and save_pretrained."""

from __future__ import annotations

import pytest

from tests import checkpoints


@pytest.fixture(scope="session")
def tiny_qwen35(tmp_path_factory):
    """The default tiny Qwen3.5 text checkpoint (3 GDN + 1 attention layer, untied head)."""
    return checkpoints.make_qwen35_with_tokenizer(
        tmp_path_factory.mktemp("ckpt") / "qwen35", **checkpoints.TINY_CONFIGS["base"]
    )
