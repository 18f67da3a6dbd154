"""The oracle: the original checkpoint run by transformers in fp32, eager."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..convert.checkpoint import open_checkpoint
from ..errors import LmbundleError
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
        """Top-1 minus top-2 logit per position: below 0.1 a flip is a tie, not an error."""
        top2 = self.logits.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]


class Oracle:
    def __init__(self, source: str):
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
        change the path), through the eos tokens, like `Engine.generate(..., stop=False)`."""
        first = self.forward(ids)
        tokens, cache = [int(first.top1[-1])], first.cache
        while len(tokens) < steps:
            tokens.append(int(self.step(cache, tokens[-1]).argmax()))
        return tokens


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
