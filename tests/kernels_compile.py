"""Compile the Triton kernels for Hopper (sm_90: the H100 and H200) the way the 2B's decode step, prompt chunks
and batched step launch them, on any machine (`tests/test_kernels_compile.py` runs this in a process of its own:
the suite's Triton interpreter must be off for a real compile). Each wrapper runs on meta tensors (shapes, no
memory) with the module's kernels swapped for recorders; each recorded launch is compiled ahead of time by
Triton's own compiler and ptxas, no GPU needed. Prints {label: shared memory bytes} as JSON; with --resources
also each kernel's registers and spills (`python -m tests.kernels_compile --resources`)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmbundle.engine.kernels import rows_tuning, triton_chunks, triton_gemv, triton_mixers, triton_rows
from lmbundle.engine.kernels import triton_rows_linear
from lmbundle.models.ops import Norm

HOPPER = GPUTarget("cuda", 90, 32)
OPTIONS = ("num_warps", "num_stages", "launch_pdl")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8",
         torch.int32: "i32", torch.int64: "i64"}

# Qwen3.5-2B: hidden 2048; GDN 16 x 128 key and value heads (conv 6144 channels, fused in_proj 8224 rows);
# attention 8 heads of 256 (with output gate) over 2 KV heads, rotary on 64 dims; MLP 6144; vocabulary 248,320.
HIDDEN, CONV, IN_PROJ, MLP, VOCAB, GROUPS = 2048, 6144, 8224, 6144, 248320, 2048 // 32
ROWS = 32  # the batch scheduler's rows (--max-batch 32)
# attention layouts: (label, (heads, kv heads), head dim, rotary dims, output gate)
ATTENTION = (("Qwen3.5", (8, 2), 256, 64, True), ("Qwen3-VL", (16, 8), 128, 128, False))


class Recorder:
    """Stands in for a jitted kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, float):
        return "fp32"
    return "i32" if abs(value) < 2**31 else "i64"


def compile_launch(kernel, args: tuple, kwargs: dict):
    """The recorded launch compiled for sm_90 as Triton's launcher specializes it (pointers 16-byte aligned,
    integers that are multiples of 16 marked so, integers equal to 1 made constants): (compiled kernel, its
    shared memory in bytes)."""
    names = kernel.arg_names
    values = dict(zip(names, args))
    constexprs = {name: kwargs[name] for name in names if name in kwargs}
    constexprs.update({name: 1 for name, v in values.items() if type(v) is int and v == 1})
    signature = {name: "constexpr" if name in constexprs else _type(values[name]) for name in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name not in constexprs and (
        isinstance(values[name], torch.Tensor) or (type(values[name]) is int and values[name] % 16 == 0))}
    options = {k: v for k, v in kwargs.items() if k in OPTIONS}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=HOPPER, options=options)
    return compiled, compiled.metadata.shared


def launches(module, name: str, call) -> list[tuple]:
    """Run `call()` with every kernel of `module` recorded; the launches of module.<name>."""
    kernels = {k: v for k, v in vars(module).items() if k.endswith("_kernel") and hasattr(v, "arg_names")}
    recorders = {k: Recorder(v) for k, v in kernels.items()}
    for k, recorder in recorders.items():
        setattr(module, k, recorder)
    try:
        call()
    finally:
        for k, kernel in kernels.items():
            setattr(module, k, kernel)
    assert recorders[name].launches, f"{name} was not launched"
    return [(kernels[name], args, kwargs) for args, kwargs in recorders[name].launches]


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def int8(rows, columns):
    return meta(rows, columns, dtype=torch.int8), meta(rows, columns // 32, dtype=torch.float16)


def one_token_launches() -> dict[str, list]:
    x, norm = meta(HIDDEN), (meta(HIDDEN), 1e-6, True)
    gated = triton_gemv.GatedNormInput(meta(HIDDEN), meta(16, 8, dtype=torch.float32), meta(HIDDEN), meta(128),
                                       1e-6, 128)
    gemv = {
        "in_proj + norm + conv": lambda: triton_gemv.gemv(x, *int8(IN_PROJ, HIDDEN), norm=norm,
                                                          conv=(meta(CONV, 3), meta(CONV, 4)), pdl=True),
        "gate/up + norm + SwiGLU": lambda: triton_gemv.gemv(x, *int8(MLP, HIDDEN), *int8(MLP, HIDDEN), norm=norm,
                                                            pdl=True),
        "out_proj + gated norm + residual": lambda: triton_gemv.gemv(x, *int8(HIDDEN, HIDDEN), gated_norm=gated,
                                                                     residual=meta(HIDDEN), pdl=True),
        "down + residual": lambda: triton_gemv.gemv(meta(MLP), *int8(HIDDEN, MLP), residual=meta(HIDDEN), pdl=True),
        "head + norm": lambda: triton_gemv.gemv(x, *int8(VOCAB, HIDDEN), norm=norm, pdl=True),
        "bf16 head + norm": lambda: triton_gemv.gemv(x, meta(VOCAB, HIDDEN), norm=norm, pdl=True),
        "dequantize (prompt chunks)": lambda: triton_gemv.dequantize(*int8(MLP, HIDDEN), torch.bfloat16),
    }
    found = {label: launches(triton_gemv, "_gemv_kernel" if "dequantize" not in label else "_dequantize_kernel",
                             call) for label, call in gemv.items()}
    found["GDN delta rule"] = launches(triton_mixers, "_gated_delta_kernel", lambda: triton_mixers.gated_delta_step(
        meta(IN_PROJ), meta(16, dtype=torch.float32), meta(16, dtype=torch.float32),
        meta(16, 128, 128, dtype=torch.float32), (16, 16), (128, 128), pdl=True))
    for label, heads, dim, rot, gate in ATTENTION:
        h, kvh = heads
        width = h * dim * (2 if gate else 1) + 2 * kvh * dim

        def attention():
            triton_mixers.attention_step(meta(width), meta(1, dtype=torch.int64), meta(dim), meta(dim),
                                         meta(1, rot, dtype=torch.float32), meta(1, rot, dtype=torch.float32),
                                         meta(kvh, 4096, dim), meta(kvh, 4096, dim), heads, dim, gate, True, 1e-6,
                                         pdl=True)

        found[f"{label} attention split"] = launches(triton_mixers, "_attention_split_kernel", attention)
        found[f"{label} attention combine"] = launches(triton_mixers, "_attention_combine_kernel", attention)
    return found


def rows_launches() -> dict[str, list]:
    """The batched step's kernels (`triton_rows`) at the 2B's shapes, as `RowStepOps` launches them: its
    block sizes (`rows_tuning`), programmatic dependent launches."""
    norm = Norm(meta(HIDDEN), 1e-6, True)
    gated = triton_gemv.GatedNormInput(meta(ROWS, HIDDEN), meta(ROWS, 16, 8, dtype=torch.float32),
                                       meta(ROWS, HIDDEN), meta(128), 1e-6, 128)
    config = rows_tuning.rows_config
    found = {"rows norm": launches(triton_rows, "_rms_norm_rows_kernel", lambda: triton_rows.rms_norm_rows(
                 meta(ROWS, HIDDEN), norm, **config("rms_norm_rows"), pdl=True)),
             "rows GDN gated norm": launches(triton_rows, "_gated_norm_rows_kernel",
                                             lambda: triton_rows.gated_norm_rows(gated, **config("gated_norm_rows"),
                                                                                 pdl=True))}
    live = meta(ROWS, dtype=torch.int32)
    found["rows GDN conv"] = launches(triton_rows, "_conv_silu_rows_kernel", lambda: triton_rows.conv_silu_rows(
        meta(ROWS, IN_PROJ), live, meta(ROWS, CONV, 3), meta(CONV, 4), **config("conv_silu_rows"), pdl=True))
    found["rows GDN delta rule"] = launches(
        triton_rows, "_gated_delta_rows_kernel", lambda: triton_rows.gated_delta_rows(
            meta(ROWS, IN_PROJ), live, meta(16, dtype=torch.float32), meta(16, dtype=torch.float32),
            meta(ROWS, 16, 128, 128, dtype=torch.float32), (16, 16), (128, 128), **config("gated_delta_rows"),
            pdl=True))

    def attention():
        triton_rows.attention_rows(meta(ROWS, 5120), meta(ROWS, dtype=torch.int64), live, meta(256), meta(256),
                                   meta(ROWS, 64, dtype=torch.float32), meta(ROWS, 64, dtype=torch.float32),
                                   meta(ROWS, 2, 4096, 256), meta(ROWS, 2, 4096, 256), (8, 2), 256, True, True, 1e-6,
                                   **config("attention_rows"), pdl=True)

    found["rows attention split"] = launches(triton_rows, "_attention_rows_split_kernel", attention)
    found["rows attention combine"] = launches(triton_rows, "_attention_rows_combine_kernel", attention)
    return {**found, **rows_linear_launches()}


def rows_linear_launches() -> dict[str, list]:
    """The batched step's int8 linears (`triton_rows_linear`) at the 2B's shapes and ROWS rows, with the tiles
    and fused epilogues `RowStepOps` gives them."""
    counters = meta(4096, dtype=torch.int32)
    linears = {  # label: (outputs, inputs, fused)
        "rows int8 in_proj": (IN_PROJ, HIDDEN, ""), "rows int8 attention qkv": (5120, HIDDEN, ""),
        "rows int8 out_proj + residual": (HIDDEN, HIDDEN, "residual"),
        "rows int8 gate/up + SwiGLU": (MLP, HIDDEN, "swiglu"), "rows int8 down + residual": (HIDDEN, MLP, "residual"),
        "rows int8 head": (VOCAB, HIDDEN, ""),
    }
    found = {}
    for label, (rows, columns, fused) in linears.items():
        tiles = rows_tuning.linear_tiles(rows, columns, ROWS, fused == "swiglu")
        kwargs = {"residual": meta(ROWS, rows)} if fused == "residual" else {}
        if fused == "swiglu":
            kwargs["up"] = int8(rows, columns)
        found[label] = launches(triton_rows_linear, "_rows_linear_kernel", lambda: triton_rows_linear.rows_linear(
            meta(ROWS, columns), int8(rows, columns), tiles, counters, pdl=True, **kwargs))
    return found


def resources(compiled) -> str:
    """Registers and stack (spills) of a compiled kernel, from the cubin (cuobjdump, bundled with Triton)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    return " ".join(next((line for line in out.splitlines() if "REG:" in line), "").split()[:2])


def prompt_launches() -> dict[str, list]:
    """Prompt chunks' kernels (`triton_chunks`) for a 2,048-token chunk: attention (Qwen3.5's and Qwen3-VL's
    heads), the GDN's inputs, 64 WY chunks of 32 prepared and walked, the output norm."""
    heads, n, chunk, dim = 16, 64, 32, 128
    chunks = triton_chunks.WYChunks(*(meta(heads, n, chunk, width, dtype=torch.float32)
                                      for width in (dim, dim, dim, chunk, dim)),
                                    meta(heads, n, dtype=torch.float32))
    state = meta(heads, dim, dim, dtype=torch.float32)
    qk, g = meta(n * chunk, heads, dim, dtype=torch.float32), meta(n * chunk, heads, dtype=torch.float32)
    valid = meta(1, dtype=torch.int64)

    def inputs():
        triton_chunks.gdn_inputs(meta(n * chunk, IN_PROJ), meta(CONV, 3), meta(CONV, 4),
                                 meta(heads, dtype=torch.float32), meta(heads, dtype=torch.float32), (heads, heads),
                                 (dim, dim), valid)

    found = {}
    for label, (h, kvh), dim, rot, gate in ATTENTION:
        width = h * dim * (2 if gate else 1) + 2 * kvh * dim

        def attention():
            triton_chunks.attention_chunk(
                meta(n * chunk, width), meta(n * chunk, dtype=torch.int64), meta(dim), meta(dim),
                meta(n * chunk, rot, dtype=torch.float32), meta(n * chunk, rot, dtype=torch.float32),
                meta(kvh, 4096, dim), meta(kvh, 4096, dim), 4096, (h, kvh), dim, gate, True, 1e-6)

        found[f"{label} attention k/v (prompt chunks)"] = launches(triton_chunks, "_chunk_kv_kernel", attention)
        found[f"{label} attention (prompt chunks)"] = launches(triton_chunks, "_chunk_attention_kernel", attention)
    return {**found,
            "GDN conv + delta rule inputs (prompt chunks)": launches(triton_chunks, "_gdn_inputs_kernel", inputs),
            "GDN conv state (prompt chunks)": launches(triton_chunks, "_conv_state_kernel", inputs),
            "GDN output norm (prompt chunks)": launches(
                triton_chunks, "_gated_norm_chunk_kernel",
                lambda: triton_chunks.gated_norm_chunk(chunks.w_v, meta(n * chunk, HIDDEN), meta(dim), 1e-6)),
            "GDN WY chunks (prompt chunks)": launches(triton_chunks, "_wy_chunks_kernel",
                                                      lambda: triton_chunks.wy_chunks(qk, qk, qk, g, g, chunk)),
            "GDN WY walk (prompt chunks)": launches(triton_chunks, "_wy_recurrence_kernel",
                                                    lambda: triton_chunks.wy_recurrence(chunks, state))}


def main() -> None:
    """JSON {label: shared memory bytes}; with --resources, a table with registers and spills (tuning the
    kernels without a GPU)."""
    shared = {}
    for label, recorded in {**one_token_launches(), **rows_launches(), **prompt_launches()}.items():
        kernel, args, kwargs = recorded[0]  # a wrapper launches one configuration of each kernel
        compiled, shared[label] = compile_launch(kernel, args, kwargs)
        if "--resources" in sys.argv:
            print(f"{label:40s} {kwargs.get('num_warps', 4)} warps  {resources(compiled)}  "
                  f"shared {shared[label]} B", file=sys.stderr)
    json.dump(shared, sys.stdout)


if __name__ == "__main__":
    main()
