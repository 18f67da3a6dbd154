"""Bundles: format, quant recipes, atomic writes, integrity checks, and bad checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmbundle.bundle.format import open_bundle
from lmbundle.bundle.load import load_graph
from lmbundle.convert.checkpoint import open_checkpoint
from lmbundle.convert.convert import convert, load_checkpoint_graph
from lmbundle.errors import LmbundleError
from tests import checkpoints


@pytest.fixture(scope="module")
def bundles(tiny_qwen35, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {q: convert(str(tiny_qwen35), root / q, quant=q, backend="torch", log=None)
            for q in ("fp16", "int8lin", "int8hu")}


def test_metadata_is_a_language_bundle_superset(bundles, tiny_qwen35):
    meta = json.loads((bundles["int8hu"] / "metadata.json").read_text())
    assert meta["metadata_version"] == "0.2" and meta["kind"] == "llm"
    assert meta["language"]["vocab_size"] == 320 and meta["language"]["embedded_tokenizer"] is True
    assert meta["language"]["function_map"] == {"main": ["main"]}
    info = meta["lmbundle"]
    assert info["architecture"] == "qwen3_5" and info["quant"]["mode"] == "int8hu"
    assert info["state"]["key"]["shape"] == [1, 1, 2, 4096, 32] and info["state"]["key"]["grows"]
    assert info["state"]["rec"]["shape"] == [3, 1, 4, 16, 32]
    assert set(info["files"]) >= {"weights.safetensors", "tokenizer/tokenizer.json", "tokenizer/chat_template.jinja"}
    # no path of the machine that converted it: a local checkpoint is named by its folder
    assert meta["source"] == {"model_definition": "torch", "hf_model_id": tiny_qwen35.name, "hf_revision": None}
    assert meta["language"]["tokenizer"] == tiny_qwen35.name
    assert str(tiny_qwen35.parent) not in json.dumps(meta)


def test_hub_checkpoints_are_named_by_id_and_revision(tmp_path):
    from lmbundle.convert.checkpoint import hub_origin

    snapshot = tmp_path / "models--Qwen--Qwen3.5-2B" / "snapshots" / "0123abc"
    assert hub_origin("Qwen/Qwen3.5-2B", snapshot) == ("Qwen/Qwen3.5-2B", "0123abc")
    assert hub_origin(str(tmp_path), tmp_path) == (None, None)


def test_quant_layouts_and_bytes_per_token(bundles):
    w = {q: load_file(str(b / "weights.safetensors")) for q, b in bundles.items()}
    assert w["fp16"]["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    assert w["fp16"]["model.layers.0.linear_attn.A_log"].dtype == torch.float32  # GDN params stay fp32
    q = w["int8lin"]["model.layers.0.mlp.up_proj.qweight"]
    assert q.dtype == torch.int8 and w["int8lin"]["model.layers.0.mlp.up_proj.scales"].shape == (128, 2)
    assert w["int8lin"]["lm_head.weight"].dtype == torch.float16  # untied checkpoint: head stays fp16
    assert w["int8hu"]["lm_head.qweight"].dtype == torch.int8
    reads = {qm: open_bundle(b).info["bytes_per_token"]["weights"] for qm, b in bundles.items()}
    assert reads["int8hu"] < reads["int8lin"] < reads["fp16"]


@pytest.mark.parametrize("quant,tol", [("fp16", 2e-2), ("int8lin", 0.15), ("int8hu", 0.2)])
def test_bundle_graph_matches_checkpoint(bundles, tiny_qwen35, quant, tol):
    ref = load_checkpoint_graph(open_checkpoint(tiny_qwen35))
    ours = load_graph(open_bundle(bundles[quant]))
    ids = torch.arange(5, 25)
    with torch.no_grad():
        a = ref.forward_tokens(ids, 0, ref.new_state(32))
        b = ours.forward_tokens(ids, 0, ours.new_state(32))
    assert (a - b).abs().max() < tol


@pytest.mark.parametrize("quant", ["fp16", "int8hu"])
def test_fused_projections_compute_the_same(bundles, quant):
    """The GPU layout (q/k/v and the four GDN input projections read as one weight) changes no result."""
    model = load_graph(open_bundle(bundles[quant]))
    ids = torch.arange(3, 30)
    with torch.no_grad():
        plain = model.forward_tokens(ids, 0, model.new_state(32))
        model.fuse_projections_()
        fused = model.forward_tokens(ids, 0, model.new_state(32))
    assert (plain - fused).abs().max() < 1e-4


def test_perchannel_head_and_tied_untie(tmp_path):
    ckpt = checkpoints.make_qwen35_with_tokenizer(tmp_path / "tied", **checkpoints.TINY_CONFIGS["tied_mha"])
    lin = convert(str(ckpt), tmp_path / "lin", quant="int8lin", backend="torch", log=None)
    hu = convert(str(ckpt), tmp_path / "hu", quant="int8hu", head_quant="perchan", backend="torch", log=None)
    assert open_bundle(lin).info["quant"]["head"] == "tied-fp16"
    assert "lm_head.weight" not in load_file(str(lin / "weights.safetensors"))  # stored once, as the embedding
    assert load_file(str(hu / "weights.safetensors"))["lm_head.scales"].shape == (320, 1)
    model = load_graph(open_bundle(hu))
    assert model.lm_head.qweight is not None and model.model.embed_tokens.weight.dtype == torch.float32


def test_convert_refuses_to_overwrite_and_leaves_nothing_on_failure(bundles, tiny_qwen35, tmp_path):
    before = sorted(p.name for p in bundles["fp16"].iterdir())
    with pytest.raises(LmbundleError, match="already exists"):
        convert(str(tiny_qwen35), bundles["fp16"], quant="fp16", backend="torch", log=None)
    assert sorted(p.name for p in bundles["fp16"].iterdir()) == before
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen35, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LmbundleError, match=r"up_proj.weight has shape \(64, 64\), the config implies \(128, 64\)"):
        convert(str(broken), tmp_path / "out", quant="fp16", backend="torch", log=None)
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_damaged_bundle_and_wrong_version(bundles, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundles["int8hu"], copy)
    with open(copy / "weights.safetensors", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"xxxxxxxxxx")
    with pytest.raises(LmbundleError, match="sha256 does not match"):
        load_graph(open_bundle(copy))
    meta = json.loads((copy / "metadata.json").read_text())
    meta["lmbundle"]["bundle_version"] = 99
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(LmbundleError, match="bundle version 99 is not supported"):
        open_bundle(copy)
    with pytest.raises(LmbundleError, match="not a bundle"):
        open_bundle(tmp_path)


def test_bad_checkpoints(tiny_qwen35, tmp_path):
    with pytest.raises(LmbundleError, match="no config.json"):
        open_checkpoint(tmp_path)
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(LmbundleError, match="unsupported architecture LlamaForCausalLM"):
        open_checkpoint(other)
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_qwen35, sharded)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(LmbundleError, match="model-00002-of-00002.safetensors: shard listed .* is missing"):
        open_checkpoint(sharded)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_qwen35, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LmbundleError, match="model.safetensors: unreadable or truncated"):
        load_checkpoint_graph(open_checkpoint(truncated))
    with pytest.raises(LmbundleError, match="cannot fetch hub model 'nobody-here/no-such-model'"):
        open_checkpoint("nobody-here/no-such-model")


def test_multimodal_layout_loads_its_text_part(tmp_path):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(checkpoints.BASE)
    cfg = Qwen3_5Config(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                                             num_heads=2, out_hidden_size=64))
    Qwen3_5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "vl")
    ckpt = open_checkpoint(tmp_path / "vl")
    assert ckpt.architecture.name == "qwen3_5" and ckpt.has_vision
    ref = Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path / "vl", dtype=torch.float32).eval()
    ours = load_checkpoint_graph(ckpt)
    ids = torch.arange(3, 15)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
        got = ours.forward_tokens(ids, 0, ours.new_state(32))
    assert (expected - got).abs().max() < 1e-4
