"""Linear layers of the graph: dense (fp32/fp16/bf16) or int8 with symmetric absmax scales.

int8 weights are stored as `qweight` int8 [out, in] and `scales` fp16 [out, in // block] with
w = qweight * scale (block = 32 along the input dim, or block = in for per-channel). Never clipped:
absmax keeps every outlier row exact to within half a step, which is what keeps top-1 stable.

How an int8 linear is computed in the step graph is a backend choice, made by the graph's ops object
(`ops.py`: dequantize-then-matmul by default, a Triton GEMV on CUDA, Core AI's blockwise constant in the
exporter); `Linear.forward` is the reference, for modules outside the step graph (the vision encoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32


def quantize_absmax(weight: torch.Tensor, block: int = BLOCK, rows_per_pass: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 over blocks of `block` input columns; returns (qweight, fp16 scales).

    Works through `rows_per_pass` rows at a time so a 248k-row head needs no full fp32 copy."""
    out_features, in_features = weight.shape
    if in_features % block:
        raise ValueError(f"input dim {in_features} is not a multiple of the block {block}")
    q = torch.empty(out_features, in_features, dtype=torch.int8)
    scales = torch.empty(out_features, in_features // block, dtype=torch.float16)
    for start in range(0, out_features, rows_per_pass):
        rows = slice(start, start + rows_per_pass)
        w = weight[rows].float().reshape(-1, in_features // block, block)
        scale = (w.abs().amax(dim=-1, keepdim=True) / 127.0).to(torch.float16).float()  # quantize against the stored scale
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q[rows] = torch.clamp(torch.round(w / safe), -127, 127).to(torch.int8).reshape(-1, in_features)
        scales[rows] = scale.squeeze(-1).to(torch.float16)
    return q.to(weight.device), scales.to(weight.device)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out_features, in_features = qweight.shape
    block = in_features // scales.shape[1]
    w = qweight.reshape(out_features, -1, block).to(dtype) * scales.to(dtype).unsqueeze(-1)
    return w.reshape(out_features, in_features)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference int8 linear: dequantize to x's dtype, then one matmul."""
    return F.linear(x, dequantize(qweight, scales, x.dtype))


class DenseCopies:
    """Dense copies of chosen int8 weights (the values `dequantize` gives), made once: memory traded for
    the time of expanding a weight on every call where one weight serves many rows (prompt chunks, the
    batched step). Keyed by the int8 tensor's storage, which lives as long as the model."""

    def __init__(self, linears: list[Linear], dtype: torch.dtype):
        self.dtype = dtype
        self._copies = {w.qweight.data_ptr(): dequantize(w.qweight, w.scales, dtype) for w in linears}
        self.nbytes = sum(t.numel() * t.element_size() for t in self._copies.values())

    def get(self, qweight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        return self._copies.get(qweight.data_ptr()) if dtype == self.dtype else None


class Linear(nn.Module):
    """A bias-free linear layer that is either dense (`weight`) or int8 (`qweight` + `scales`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: torch.Tensor | None = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.register_buffer("qweight", None)  # int8 [out, in] once quantized
        self.register_buffer("scales", None)  # fp16 [out, in // block]

    @property
    def quantized(self) -> bool:
        return self.qweight is not None

    def quantize_(self, block: int = BLOCK) -> None:
        """Replace the dense weight by int8 + scales (block = in_features gives per-channel)."""
        q, s = quantize_absmax(self.weight.data, block)
        del self.weight
        self.weight = None
        self.qweight, self.scales = q, s

    @classmethod
    def concat(cls, parts: list["Linear"]) -> "Linear":
        """One linear computing the parts' outputs side by side (same input): one weight read, one launch."""
        fused = cls(parts[0].in_features, sum(p.out_features for p in parts))
        del fused.weight
        fused.weight = None
        if all(p.quantized for p in parts) and len({p.scales.shape[1] for p in parts}) == 1:
            fused.qweight = torch.cat([p.qweight for p in parts])
            fused.scales = torch.cat([p.scales for p in parts])
        elif not any(p.quantized for p in parts):
            fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        else:
            raise ValueError("cannot concatenate int8 and dense linears")
        return fused

    def dequantize_(self, dtype: torch.dtype) -> None:
        """Replace int8 + scales by the dense weight they stand for (the values `forward` would
        dequantize on every call): the CPU backend's trade of 4x the memory for 4-7x the speed."""
        if self.quantized:
            self.weight = nn.Parameter(dequantize(self.qweight, self.scales, dtype), requires_grad=False)
            self.qweight = self.scales = None

    def as_int8_(self, block: int = BLOCK) -> None:
        """Make room for int8 weights to be loaded (a bundle's layout, read from its metadata)."""
        del self.weight
        self.weight = None
        self.qweight = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        self.scales = torch.empty(self.out_features, self.in_features // block, dtype=torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return int8_matmul(x, self.qweight, self.scales)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        kind = f"int8/{self.in_features // self.scales.shape[1]}" if self.quantized else str(self.weight.dtype)
        return f"{self.in_features} -> {self.out_features}, {kind}"
