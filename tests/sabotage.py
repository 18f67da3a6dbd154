"""Breakages made on purpose: a bundle copied, one thing changed, and the sha256 entries of metadata.json
rewritten so the hash check still passes (unless the breakage is the hash itself); each returns the
damaged bundle's folder. `reexported` rebuilds the .aimodel from (damaged) weights, under whatever graph
bug is patched in at the time (`prompt_conv_reversed`, `short_triangular_solve`, ...), so only the Core AI
backend runs the damage. `Model` holds a checkpoint, its oracle and its bundles for the suites."""

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


def swap_modules(a: str, b: str) -> Callable[[Tensors], None]:
    """Two modules' tensors exchanged (the same shapes: e.g. one layer's MLP for another's)."""
    def edit(t: Tensors) -> None:
        keys = [s for s in (".weight", ".qweight", ".scales") if f"{a}{s}" in t]
        assert keys, a
        for s in keys:
            t[f"{a}{s}"], t[f"{b}{s}"] = t[f"{b}{s}"].clone(), t[f"{a}{s}"].clone()
    return edit


def edits(*parts: Callable[[Tensors], None]) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        for part in parts:
            part(t)
    return edit


def requantize_body_per_channel(src: Path, dst: Path) -> Path:
    """Every int8 linear of the body re-quantized per channel and the recipe rewritten to match, while the
    mode and Apple's `compression` still declare per-block-32 (hashes rewritten)."""
    from lmbundle.bundle.format import write_safetensors
    from lmbundle.models.linear import dequantize, quantize_absmax

    copy_bundle(src, dst)
    meta = _meta(dst)
    recipe = meta["lmbundle"]["quant"]
    path = dst / meta["lmbundle"]["weights"]
    tensors = load(path.read_bytes())
    for module in recipe["int8_linears"]:
        if module == "lm_head":
            continue
        weight = dequantize(tensors[f"{module}.qweight"], tensors[f"{module}.scales"])
        tensors[f"{module}.qweight"], tensors[f"{module}.scales"] = quantize_absmax(weight, weight.shape[1])
        recipe["int8_linears"][module] = weight.shape[1]
    write_safetensors(path, tensors, metadata={"format": "pt"})
    (dst / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    rehash(dst)
    return dst


def edit_tokenizer_file(src: Path, dst: Path, name: str, edit: Callable[[dict], None]) -> Path:
    """A JSON file of the bundle's tokenizer folder edited (tokenizer.json, generation_config.json), rehashed."""
    copy_bundle(src, dst)
    path = dst / "tokenizer" / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    rehash(dst)
    return dst


def edit_vision(src: Path, dst: Path, **fields) -> Path:
    """The metadata's vision section with `fields` changed, rehashed."""
    copy_bundle(src, dst)
    meta = _meta(dst)
    meta["vision"].update(fields)
    (dst / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    rehash(dst)
    return dst


def fixed_image_size(src: Path, dst: Path, side: int) -> Path:
    """The encoder's fixed image size changed, with every field that follows from it (grid, tokens)."""
    vision = _meta(src)["vision"]
    grid, merged = side // vision["patch_size"], side // vision["patch_size"] // vision["merge_size"]
    tokens = merged * merged
    return edit_vision(src, dst, image_size=side, grid_thw=[1, grid, grid], merged_grid=[merged, merged],
                       tokens_per_image=tokens, image_token_count=tokens)


def reexported(src: Path, dst: Path, edit: Callable[[Tensors], None] = lambda t: None) -> Path:
    """The bundle with its .aimodel exported again (under whatever the caller patched) from its weights
    with `edit` applied; the safetensors stay as they were (the damage is in the .aimodel only)."""
    return edit_weights(src, dst, edit, coreai=True, aimodel_only=True)


# -- graph bugs (monkeypatched; a re-export while patched puts them in the .aimodel) -------------------------
def prompt_conv_reversed(monkeypatch) -> None:
    """Multi-token chunks (a prompt function, the chunked prefill) run the causal conv's taps reversed."""
    from lmbundle.models import layers

    original = layers.causal_conv

    def broken(x, conv_state, weight, valid=None):
        return original(x, conv_state, weight.flip(-1) if x.shape[-2] > 1 else weight, valid)

    monkeypatch.setattr(layers, "causal_conv", broken)


def short_triangular_solve(monkeypatch, factors: int = 2) -> None:
    """The exported prompt function's unit lower-triangular solve (the WY chunk's) cut to `factors`
    factors of (I + N)(I + N^2)...: exact only while N^(2^factors) vanishes."""
    from lmbundle.convert import coreai_export

    def short(a, b, upper=False, left=True, unitriangular=True):
        n, x = -torch.tril(a, diagonal=-1), b
        for _ in range(factors):
            x = x + n @ x
            n = n @ n
        return x

    monkeypatch.setattr(coreai_export, "_unit_lower_solve", short)


def rope_frequencies_scaled(monkeypatch, factor: float) -> None:
    """The graph's RoPE inverse frequencies off by `factor` (graphs built after this)."""
    from lmbundle.models import decoder

    original = decoder.rope_inv_freq
    monkeypatch.setattr(decoder, "rope_inv_freq", lambda *args, **kwargs: original(*args, **kwargs) * factor)


def bgr_pixels(monkeypatch) -> None:
    """The image path hands the encoder BGR instead of RGB."""
    from lmbundle.engine import image

    original = image.normalize
    monkeypatch.setattr(image, "normalize", lambda img, spec: original(img, spec).flip(0))


# -- the models the breakages are made on ---------------------------------------------------------------------
QUANT_MODES = {"fp16": ("fp16", "block32"), "int8lin": ("int8lin", "block32"), "int8hu": ("int8hu", "block32"),
               "int8hu-perchan": ("int8hu", "perchan")}
SHORT_PROMPT = "Once upon a time, in a small village by the sea, there lived"


class Model:
    """One checkpoint: its oracle, simulated oracles per recipe and converted bundles, made on first use."""

    def __init__(self, checkpoint: Path, root: Path):
        from lmbundle.gates.oracle import Oracle

        self.checkpoint, self.root = Path(checkpoint), root
        self.oracle = Oracle(str(checkpoint))
        self.bundles, self._simulated, self._count = {}, {}, 0

    def bundle(self, mode: str, coreai: bool = False) -> Path:
        from lmbundle.convert.convert import convert

        key = (mode, coreai)
        if key not in self.bundles:
            quant, head = QUANT_MODES[mode]
            self.bundles[key] = convert(str(self.checkpoint), self.root / f"{mode}-{int(coreai)}", quant=quant,
                                        head_quant=head, backend="all" if coreai else "torch", log=None)
        return self.bundles[key]

    def simulated(self, recipe: dict):
        key = repr(sorted(recipe.items()))
        if key not in self._simulated:
            self._simulated[key] = self.oracle.simulated(recipe)
        return self._simulated[key]

    def gate(self, path: Path, backend: str = "torch", prompts=(SHORT_PROMPT,), rollouts: int = 8,
             coverage: int | None = None):
        """The gate on `prompts` (no chat prompt): () and coverage 0 run its static checks only."""
        from lmbundle.engine.engine import Engine
        from lmbundle.gates.gate import run_gate
        from lmbundle.gates.weights import expected_recipe

        engine = Engine(path, backend=backend, device="cpu" if backend == "torch" else None)
        try:
            recipe, _ = expected_recipe(engine.bundle, self.oracle)
            return run_gate(engine, self.oracle, prompts=prompts, chat=None, rollouts=rollouts, coverage=coverage,
                            simulated=self.simulated(recipe))
        finally:
            if hasattr(engine.backend, "close"):
                engine.backend.close()

    def static(self, path: Path, backend: str = "torch"):
        return self.gate(path, backend, prompts=(), coverage=0)

    def rare_ids(self, count: int = 2) -> list[int]:
        """Ids that no gate text prompt holds (the issue's 'rare rows')."""
        from lmbundle.gates.gate import PROMPTS

        seen = {t for text in (*PROMPTS, SHORT_PROMPT) for t in self.oracle.tokenizer.encode(text, add_special_tokens=False)}
        vocab = self.oracle.model.config.get_text_config().vocab_size
        limit = min(vocab, len(self.oracle.tokenizer))
        return [t for t in range(limit - 1, 0, -1) if t not in seen][:count]

    def common_ids(self) -> list[int]:
        counts: dict[int, int] = {}
        for t in self.oracle.tokenizer.encode(SHORT_PROMPT, add_special_tokens=False):
            counts[t] = counts.get(t, 0) + 1
        return sorted(counts, key=counts.get, reverse=True)[:2]

    def fresh(self, name: str) -> Path:
        self._count += 1
        return self.root / f"sabotage-{self._count}-{name.split()[0]}"


def figures(report) -> str:
    return (f"paths {report.paths} states {report.states} (bound {report.bound:g}) weights_bad {len(report.weights_bad)} "
            f"aimodel_bad {report.aimodel_bad[:4]} rollouts {report.rollout_identical}/{report.prompts} "
            f"(+{report.rollout_excused} excused) quality top1 {report.quality_top1:.3f} kl {report.quality_kl:.2e} "
            f"top5 {report.quality_top5:.3f}")
