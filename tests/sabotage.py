"""Breakages made on purpose, the way issue 18 made them: a bundle copied, one thing changed, and the
sha256 entries of metadata.json rewritten so the hash check still passes (unless the breakage is the
hash itself). Each returns the damaged bundle's folder. `reexport` rebuilds the .aimodel from the
damaged weights, so the Core AI backend runs the same damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load

Tensors = dict[str, torch.Tensor]


def _meta(folder: Path) -> dict:
    return json.loads((folder / "metadata.json").read_text())


def rehash(folder: Path) -> None:
    """Rewrite every recorded hash (what a careless or malicious edit would do)."""
    from lmbundle.bundle import format as fmt

    meta = _meta(folder)
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    fmt.write_metadata(folder, meta)


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(src: Path, dst: Path, edit: Callable[[Tensors], None], coreai: bool = False,
                 aimodel_only: bool = False) -> Path:
    """Copy, edit the weights, rewrite the hashes (and re-export the .aimodel from them if asked; with
    `aimodel_only` the safetensors are put back as they were, so only the .aimodel is damaged)."""
    from lmbundle.bundle.format import write_safetensors

    copy_bundle(src, dst)
    path = dst / _meta(dst)["lmbundle"]["weights"]
    tensors = load(path.read_bytes())  # not mmapped: the file is rewritten below
    edit(tensors)
    write_safetensors(path, tensors, metadata={"format": "pt"})
    if coreai:
        reexport(dst)
    if aimodel_only:
        shutil.copy2(src / path.name, path)
    rehash(dst)
    return dst


def edit_file_tensors(src: Path, dst: Path, rel: str, edit: Callable[[Tensors], None]) -> Path:
    """Copy, edit the tensors of another safetensors file of the bundle (the vision encoder's), rehash."""
    from lmbundle.bundle.format import write_safetensors

    copy_bundle(src, dst)
    path = dst / rel
    tensors = load(path.read_bytes())
    edit(tensors)
    write_safetensors(path, tensors, metadata={"format": "pt"})
    rehash(dst)
    return dst


def reexport(folder: Path) -> None:
    """Rebuild the bundle's .aimodel from its (damaged) weights."""
    from lmbundle.bundle.format import open_bundle
    from lmbundle.bundle.load import load_graph
    from lmbundle.convert.coreai_export import export_aimodel

    bundle = open_bundle(folder)
    asset = bundle.aimodel_path
    model = load_graph(bundle, dtype=torch.float16, verify=False)  # the layout convert exports: fp16, int8, fp32 GDN
    shutil.rmtree(asset)
    export_aimodel(model, max_context=bundle.max_context, out_path=asset, vision=bundle.metadata.get("vision"))


def edit_metadata(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """Copy and edit metadata.json's content (no hash covered it before issue 18)."""
    copy_bundle(src, dst)
    meta = _meta(dst)
    edit(meta)
    (dst / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def swap_token_ids(src: Path, dst: Path, a: str | None = None, b: str | None = None) -> Path:
    """tokenizer.json with two vocabulary ids swapped (common tokens by default), hashes NOT updated."""
    copy_bundle(src, dst)
    path = dst / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    if a is None:
        ranked = sorted(vocab, key=vocab.get)
        a, b = ranked[70], ranked[71]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))
    return dst


# -- the edits ------------------------------------------------------------------------------------------
def swap_rows(name: str, i: int, j: int) -> Callable[[Tensors], None]:
    """Swap rows i and j of a dense table or of an int8 linear (qweight and scales together)."""
    def edit(t: Tensors) -> None:
        keys = [k for k in (f"{name}.weight", f"{name}.qweight", f"{name}.scales") if k in t]
        assert keys, name
        for k in keys:
            t[k][[i, j]] = t[k][[j, i]].clone()
    return edit


def scale(name_part: str, factor: float, suffixes=(".weight", ".scales")) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        keys = [k for k in t if name_part in k and k.endswith(suffixes)]
        assert keys, name_part
        for k in keys:
            t[k] = (t[k].float() * factor).to(t[k].dtype)
    return edit


def set_value(name: str, value: float) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[name] = torch.full_like(t[name], value)
    return edit


def negate(name: str) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[name] = -t[name]
    return edit


def clip_head(quantile: float = 0.95, block: int = 32) -> Callable[[Tensors], None]:
    """The int8 head re-quantized with block-32 scales from a quantile of |w| (outliers saturate)."""
    from lmbundle.models.linear import dequantize

    def edit(t: Tensors) -> None:
        w = dequantize(t["lm_head.qweight"], t["lm_head.scales"])
        blocks = w.reshape(w.shape[0], -1, block)
        clip = torch.quantile(blocks.abs(), quantile, dim=-1, keepdim=True)
        s = (clip / 127).half().float().clamp_min(1e-8)
        t["lm_head.qweight"] = torch.clamp(torch.round(blocks / s), -127, 127).to(torch.int8).reshape(w.shape)
        t["lm_head.scales"] = s.squeeze(-1).half()
    return edit


def add_tensor(name: str = "model.layers.0.extra.weight") -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[name] = torch.zeros(4, 4)
    return edit


def rope_on_q_only(monkeypatch, num_heads: int) -> None:
    """A graph bug: the rotation applied twice to q (angle 2p), k right."""
    from lmbundle.models import layers

    original = layers.apply_rope

    def broken(x, cos, sin):
        out = original(x, cos, sin)
        return original(out, cos, sin) if x.shape[0] == num_heads else out

    monkeypatch.setattr(layers, "apply_rope", broken)
