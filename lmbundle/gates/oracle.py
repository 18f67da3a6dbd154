"""The oracles: the original checkpoint run by transformers in fp32, eager, and the same model with the
bundle's exact quantization applied to its weights (the "simulated" oracle).

The simulated oracle takes the bundle's recipe (metadata `quant`) and applies it to the *checkpoint's*
weights, never to the bundle's: fp16 cast of every float weight, int8 absmax (block-32 or per-channel)
quantized and dequantized for the recipe's linears, GDN parameters and norms kept in fp32. Its forward
is still fp32 transformers, so a bundle that is right differs from it only by arithmetic (the backend's
compute dtype and operation order): that is what `gate.py` bounds on every vocabulary entry. The gap
between the simulated and the fp32 oracle is the quantization error, measured on its own.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..bundle.quant import keeps_high_precision
from ..convert.checkpoint import open_checkpoint
from ..errors import LmbundleError
from ..models.linear import dequantize, quantize_absmax
from ..models.state import LINEAR_ATTENTION, State, StateSpec
from ..quiet import transformers_loading


@dataclass
class OracleForward:
    logits: torch.Tensor  # [S, V] fp32, teacher-forced over the prompt
    cache: object  # transformers' cache after the prompt

    @property
    def top1(self) -> torch.Tensor:
        return self.logits.argmax(-1)

    @property
    def margin(self) -> torch.Tensor:
        """Top-1 minus top-2 logit per position."""
        top2 = self.logits.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]


def quantized_like_bundle(name: str, weight: torch.Tensor, recipe: dict[str, Any]) -> torch.Tensor:
    """What the bundle's recipe makes of the checkpoint tensor `name` (a graph name), back in fp32.

    Mirrors `bundle.quant.quantize_model`: int8 absmax over the recipe's block for its linears, fp32
    for GDN parameters and norms, fp16 for every other float weight."""
    module = name.removesuffix(".weight")
    block = recipe.get("int8_linears", {}).get(module)
    if block:
        return dequantize(*quantize_absmax(weight.detach(), block), torch.float32)
    if keeps_high_precision(name):
        return weight.detach().float().clone()
    return weight.detach().to(torch.float16).float()


class Oracle:
    """fp32 eager transformers on the checkpoint; `simulated(recipe)` gives the quantized twin."""

    def __init__(self, source: str, _model=None, _checkpoint=None, recipe: dict | None = None):
        if _model is not None:
            self.model, self.checkpoint, self.recipe = _model, _checkpoint, recipe
            self._tokenizer = None
            return
        import transformers

        ckpt = open_checkpoint(source)
        arch = next(a for a in ckpt.config.get("architectures") or ["Qwen3_5ForCausalLM"])
        model_class = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
        with warnings.catch_warnings(), transformers_loading():
            warnings.simplefilter("ignore")
            try:
                self.model = model_class.from_pretrained(str(ckpt.path), dtype=torch.float32).eval()
            except Exception as exc:
                raise LmbundleError(f"{ckpt.path}: transformers cannot load the oracle ({str(exc)[:200]})") from None
        self.checkpoint = ckpt
        self.recipe = None  # the fp32 oracle itself
        self._tokenizer = None

    # -- what the oracle reads ------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The checkpoint's own tokenizer: the gate encodes prompts with it, never with the bundle's."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.checkpoint.path))
            except Exception as exc:
                text = str(exc).strip()
                reason = text.splitlines()[0][:200] if text else type(exc).__name__
                raise LmbundleError(f"{self.checkpoint.path}: cannot load the oracle's tokenizer ({reason})") from None
        return self._tokenizer

    def text_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The decoder's parameters under the graph's (and the bundle's) names, tied ones under both."""
        out, sanitize = {}, self.checkpoint.architecture.sanitize
        for name, param in self.model.named_parameters(remove_duplicate=False):
            graph = sanitize(name)
            if graph is not None:
                out[graph] = param
        return out

    def rope_inv_freq(self) -> torch.Tensor:
        """The text decoder's RoPE inverse frequencies as transformers derives them from the config."""
        for name, buffer in self.model.named_buffers():
            if name.endswith("rotary_emb.inv_freq") and "visual" not in name:
                return buffer
        raise LmbundleError(f"{self.checkpoint.path}: the oracle has no text rotary embedding")

    def simulated(self, recipe: dict[str, Any]) -> "Oracle":
        """A copy of this oracle whose decoder weights are what the recipe makes of them (fp32 values)."""
        model = copy.deepcopy(self.model)
        twin = Oracle("", _model=model, _checkpoint=self.checkpoint, recipe=recipe)
        twin._tokenizer = self._tokenizer
        params = twin.text_parameters()
        embed, head = params.get("model.embed_tokens.weight"), params.get("lm_head.weight")
        untie = head is not None and head is embed and not recipe.get("tied_head", True)
        with torch.no_grad():
            if untie:  # int8hu unties a tied checkpoint: the head gets its own quantized copy
                new_head = quantized_like_bundle("lm_head.weight", head, recipe)
                new_head = torch.nn.Parameter(new_head, requires_grad=False)
                model.get_output_embeddings().weight = new_head
                if hasattr(model.config, "tie_word_embeddings"):
                    model.config.tie_word_embeddings = False
                params = twin.text_parameters()
            done: set[int] = set()
            for name, param in params.items():
                if id(param) in done or (untie and name == "lm_head.weight"):
                    continue
                done.add(id(param))
                param.data = quantized_like_bundle(name, param.data, recipe)
        return twin

    # -- running it -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: list[int]) -> OracleForward:
        out = self.model(torch.tensor([ids]), use_cache=True)
        return OracleForward(out.logits[0].float(), out.past_key_values)

    @torch.inference_mode()
    def step(self, cache, token: int) -> torch.Tensor:
        out = self.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def greedy(self, ids: list[int], steps: int) -> list[int]:
        """Plain argmax decoding (no generation-config processors: min-length EOS suppression would
        change the path), through the eos tokens, like the engine's requests with `ignore_eos`."""
        return self.greedy_with_logits(ids, steps)[0]

    @torch.inference_mode()
    def greedy_with_logits(self, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
        """`greedy`, and the logits [steps, V] each token was chosen from."""
        first = self.forward(ids)
        rows, cache = [first.logits[-1]], first.cache
        tokens = [int(rows[-1].argmax())]
        while len(tokens) < steps:
            rows.append(self.step(cache, tokens[-1]))
            tokens.append(int(rows[-1].argmax()))
        return tokens, torch.stack(rows)


def state_from_cache(cache, spec: StateSpec, into: State) -> None:
    """Write transformers' cache into our State (conv: its last K-1 inputs; KV: the prefix slots)."""
    for i, (kind, (a, b)) in enumerate(zip(spec.layer_types, spec.per_layer(into))):
        layer = cache.layers[i]
        if kind == LINEAR_ATTENTION:
            a.copy_(layer.conv_states[0][0][:, -a.shape[-1]:])
            b.copy_(layer.recurrent_states[0][0])
        else:
            length = layer.keys.shape[2]
            a[:, :length].copy_(layer.keys[0])
            b[:, :length].copy_(layer.values[0])
