"""`lmbundle gate`: the reasons to trust a bundle, measured against the fp32 transformers oracle.

Two questions, answered separately:

A. Is the bundle exactly the quantized model it claims to be? Reference: the *simulated* oracle
   (`Oracle.simulated`), transformers fp32 with the bundle's recipe applied to the checkpoint's weights.
   1. config: the bundle's graph config equals the one derived from the oracle checkpoint.
   2. tokenizer: the bundle's vocabulary, special tokens and chat template equal the oracle's, and every
      gate prompt (encoded with the oracle's tokenizer) encodes to the same ids with the bundle's.
   3. weights, tensor by tensor and row by row (the embedding and head included, where logits would
      need every token fed): equal to the recipe applied to the checkpoint, within one int8 step /
      one fp16 ulp; no tensor missing, none extra. On Core AI also the .aimodel's own constants: each
      recipe tensor byte for byte in its bytecode (`check_aimodel_weights`).
   4. logits on *every vocabulary entry* at *every position* of the text prompts (the bundle fed S=1
      from a zero state, the exported graph's contract) and of random-token prompts that cover the
      vocabulary (one chunked forward each on PyTorch, the prefill path; S=1 on Core AI):
      max |logit diff| / std(oracle logits) <= the backend's bound (`BOUNDS`).
   5. a step seeded from the oracle's cache: the same bound.
   6. greedy rollouts equal to the simulated oracle's; a fork is excused only where the bundle's token
      is the oracle's rank-2 and the oracle's top-2 margin is under twice the error this run measured
      in 4 (two logits each off by at most d can swap only when their margin is < 2d), at most
      `max_excused` of the rollouts (per compute type: a clean bundle's count sets it).
B. Is the quantization good enough? Simulated vs fp32 oracle over all positions of the same prompts:
   top-1 agreement, mean KL(fp32 || simulated) and top-5 overlap, against per-mode thresholds
   (`QUALITY`). With `--against` (e.g. the fp16 bundle) the rollouts must also equal that bundle's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..bundle.load import state_spec
from ..engine.engine import Engine
from ..engine.request import Request
from .oracle import Oracle, quantized_like_bundle, state_from_cache

ROLLOUT = 32
TIE_MARGIN = 0.1  # fp32-oracle top-2 margin under which a fork against `--against` counts as a tie
RANDOM_PROMPT = 256  # length of the random-token prompts
PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and then",
    "Once upon a time, in a small village by the sea, there lived",
    "The capital of France is Paris. The capital of Italy is",
    "To make a cup of tea, first boil the water, then",
    "In the beginning of the story, the young girl",
    "She opened the door and saw that the garden",
    "The old man looked at the sky and said that",
    "It was a cold winter morning when the children",
    "He walked into the room, sat down by the fire, and",
    "The ship sailed across the ocean for many days until",
    "My favourite book is the one about a little cat who",
    "After dinner the family gathered around the table to",
    "The king called his three sons and told them that",
    "When the rain stopped, the birds began to sing and",
    "There was once a poor farmer who had nothing but",
    "The river ran through the forest, past the old mill, and",
)

# Bound on max_v |bundle - simulated oracle| / std_v(simulated oracle) at any position, by the arithmetic
# the backend computes in (`compute_dtype`). Unit roundoff u: fp32 6.0e-8, fp16 4.9e-4, bf16 3.9e-3. A clean
# bundle measures about 20-300 u (a logit passes ~2 roundings per sublayer, amplified by the norms):
#   fp32 PyTorch CPU:  1.5e-6..2.1e-5 (random tiny and demo, every quant mode; CPU int8 is dequantized once)
#   fp16 Core AI:      0.011 (random tiny), 0.03-0.05 (demo)                            Linux runtime
#   bf16 PyTorch CUDA: 0.034-0.042 (random tiny), 0.10-0.14 (demo; weights also cast fp16 -> bf16)  H200
# The bound is ~4-50x the worst clean figure (a deeper real model accumulates more), ~100-300 u for the 16-bit
# types; one wrong weight tensor moves logits by 0.07 (dt_bias 0, random tiny) to 5 std (conv1d 0, demo).
BOUNDS = {"fp32": 1e-3, "fp16": 0.2, "bf16": 0.5}
# Excused forks from the simulated oracle, per 16 rollouts of 32 tokens. Clean counts: fp32 CPU 0 (demo and
# random tiny, every mode); fp16 Core AI 0 (tiny, 2 rollouts of 4-8 tokens); bf16 CUDA 5-7 (H200, demo and
# tiny, fp16 / int8lin / int8hu: bf16 paths part from fp32 ones at near-ties within ~20 tokens, so on CUDA
# the rollouts are a weak test and the logits bound and weight check carry the verdict).
EXCUSED_PER_16 = {"fp32": 1, "fp16": 3, "bf16": 10}


def max_excused(compute: str, n: int) -> int:
    return math.ceil(EXCUSED_PER_16[compute] * n / 16)


def max_against_ties(n: int) -> int:
    """Forks from `--against` excused at fp32-oracle ties: a clean int8hu vs fp16 demo bundle has 4 of 16
    32-token rollouts forking at a tie (quantization may pick the other of two near-equal tokens);
    allowed: 3/8 of the rollouts (6 of 16)."""
    return math.ceil(3 * n / 8)

# Quantization quality, simulated vs fp32 oracle, over all positions of the gate's prompts:
# (min top-1 agreement, max mean KL in nats, min top-5 overlap). Calibrated on the demo model and on
# random tiny models (tests/test_sabotage.py prints the measured figures).
# Measured (4 text prompts + the whole vocabulary as random-token prompts): fp16 top-1 >= 99.9%, KL <=
# 7.5e-7, top-5 >= 99.9%; int8lin / int8hu (block-32 or per-channel head) top-1 >= 98.6%, KL <= 3.8e-4,
# top-5 >= 98.9% on the demo (random tiny models: top-1 >= 99.1%, KL <= 7e-7). Thresholds: ~3x the worst
# measured top-1 / top-5 deficit and ~5x the worst KL.
QUALITY = {
    "fp16": (0.99, 1e-5, 0.99),
    "int8lin": (0.95, 2e-3, 0.95),
    "int8hu": (0.95, 2e-3, 0.95),
}


def compute_dtype(engine: Engine) -> str:
    """The float type a backend computes in: Core AI fp16; PyTorch fp32 on the CPU, bf16 on CUDA, fp16 on MPS."""
    if engine.backend_name == "coreai":
        return "fp16"
    return {"cuda": "bf16", "mps": "fp16"}.get(engine.device.type, "fp32")


@dataclass
class Report:
    """Figures of a gate plus what failed; PASS is an empty failure list."""

    failures: list[str] = field(default_factory=list, kw_only=True)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


@dataclass
class GateReport(Report):
    bundle: str
    backend: str
    quant: str
    compute: str = "fp32"
    bound: float = 0.0
    prompts: int = 0
    random_prompts: int = 0
    positions: int = 0
    vocab_covered: float = 0.0  # fraction of token ids fed to the bundle by the prompts
    config_ok: bool = True
    tokenizer_ok: bool = True
    weights_checked: int = 0
    weights_bad: list[str] = field(default_factory=list)
    aimodel_checked: int = 0  # Core AI: recipe tensors looked for in the .aimodel's bytecode
    aimodel_bad: list[str] = field(default_factory=list)
    exact_worst: float = 0.0  # max |diff| / std over every position and vocabulary entry
    exact_worst_abs: float = 0.0
    exact_positions_over: int = 0
    seeded_worst: float = 0.0
    seeded_min_cosine: float = 1.0
    rollout_identical: int = 0
    rollout_excused: int = 0
    rollout_tokens_matched: float = 0.0
    quality_top1: float = 1.0
    quality_kl: float = 0.0
    quality_top5: float = 1.0
    oracle_top1_last: int = 0  # fp32 oracle's top-1 at the text prompts' last position (the seed's figure)
    against: str | None = None
    against_identical: int = 0
    against_ties: int = 0

    def lines(self) -> list[str]:
        n = self.prompts
        thresholds = QUALITY.get(self.quant, QUALITY["int8hu"])
        weights = (f"{self.weights_checked} tensors equal to the recipe applied to the checkpoint"
                   if not self.weights_bad else f"{len(self.weights_bad)} of {self.weights_checked} tensors differ "
                   f"({', '.join(self.weights_bad[:3])})")
        lines = [
            f"gate  {self.bundle}  [{self.quant}, {self.backend} backend, {self.compute} compute]",
            f"  config {'== oracle' if self.config_ok else 'DIFFERS from the oracle'}   "
            f"tokenizer {'== oracle' if self.tokenizer_ok else 'DIFFERS from the oracle'}   weights: {weights}"
            + (f"\n  .aimodel: {self.aimodel_checked - len(self.aimodel_bad)}/{self.aimodel_checked} recipe tensors "
               "found byte for byte in main.mlirb" if self.aimodel_checked else ""),
            f"  exactness vs simulated oracle ({n} text + {self.random_prompts} random-token prompts, "
            f"{self.positions} positions, all {100 * self.vocab_covered:.0f}% of ids fed):",
            f"    worst max|diff|/std {self.exact_worst:.3g} (bound {self.bound:g}; abs {self.exact_worst_abs:.3g})   "
            f"seeded step {self.seeded_worst:.3g} (cos {self.seeded_min_cosine:.6f})",
            f"    greedy rollouts ({ROLLOUT}) {self.rollout_identical}/{n} identical"
            + (f" ({self.rollout_excused} excused rank-2 forks, max {max_excused(self.compute, n)})"
               if self.rollout_excused else "")
            + f"   token agreement {100 * self.rollout_tokens_matched:.1f}%",
            f"  quantization vs fp32 oracle: top-1 {100 * self.quality_top1:.1f}% (min {100 * thresholds[0]:.0f}%)   "
            f"KL {self.quality_kl:.2e} (max {thresholds[1]:.0e})   top-5 overlap {100 * self.quality_top5:.1f}% "
            f"(min {100 * thresholds[2]:.0f}%)   last-token top-1 {self.oracle_top1_last}/{n}",
        ]
        if self.against:
            lines.append(f"  greedy rollouts vs {self.against}: {self.against_identical}/{n} identical"
                         + (f" ({self.against_ties} forks at fp32-oracle ties, max {max_against_ties(n)})"
                            if self.against_ties else ""))
        return lines


def verdict(*reports: Report | None) -> str:
    """The one verdict line of a gate run (text and image parts together)."""
    failures = [f for report in reports if report is not None for f in report.failures]
    return "PASS" if not failures else "FAIL: " + "; ".join(failures)


def _prompt_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position, the bundle fed S=1 from a zero state."""
    backend = engine.backend
    backend.reset(len(ids) + 1)
    rows = []
    for pos, token in enumerate(ids):
        handle = backend.step(torch.tensor([[token]], device=engine.device), pos)
        rows.append(backend.logits(handle))
    return torch.stack(rows)


def _chunk_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Logits at every position of one chunked forward (the PyTorch backend's prefill path, which
    `run`, `chat` and `serve` use); S=1 steps where the backend has only those (Core AI)."""
    backend = engine.backend
    model = getattr(backend, "model", None)
    if model is None or not hasattr(model, "forward_tokens"):
        return _prompt_logits(engine, ids)
    backend.reset(len(ids) + 1)  # outside inference mode: the state outlives this call
    with torch.inference_mode():
        logits = model.forward_tokens(torch.tensor(ids, device=engine.device), 0, backend.state)
    return logits.float().cpu()


def _seeded_step(engine: Engine, cache, ids: list[int], token: int) -> torch.Tensor:
    backend = engine.backend
    backend.reset(len(ids) + 1)
    spec = state_spec(engine.bundle)
    backend.load_state(lambda state: state_from_cache(cache, spec, state))
    return backend.logits(backend.step(torch.tensor([[token]], device=engine.device), len(ids)))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per position: max over the vocabulary of |ours - reference|, over the reference's spread (std)."""
    ours, reference = ours.reshape(-1, reference.shape[-1]), reference.reshape(-1, reference.shape[-1])
    return (ours - reference).abs().amax(-1) / reference.std(-1).clamp_min(1e-6)


def random_prompts(vocab: int, budget: int, exclude: set[int], length: int = RANDOM_PROMPT,
                   seed: int = 0) -> list[list[int]]:
    """Random-token prompts that feed `budget` distinct ids (a seeded permutation of the vocabulary)."""
    generator = torch.Generator().manual_seed(seed)
    ids = [t for t in torch.randperm(vocab, generator=generator).tolist() if t not in exclude][:budget]
    return [ids[i : i + length] for i in range(0, len(ids), length)]


def forks_at_tie(oracle: Oracle, ids: list[int], mine: list[int], reference: list[int],
                 margin: float = TIE_MARGIN) -> bool:
    """Whether two greedy paths part where the oracle itself can hardly choose: at the fork, `mine` is
    the oracle's rank-2 token, `reference` its rank-1, and their margin is below `margin`."""
    fork = next(i for i, (a, b) in enumerate(zip(mine, reference)) if a != b)
    logits = oracle.forward(ids + reference[:fork]).logits[-1]
    top2 = logits.topk(2)
    return bool(top2.values[0] - top2.values[1] < margin) and top2.indices.tolist() == [reference[fork], mine[fork]]


# -- the checks -------------------------------------------------------------------------------------------
def check_config(engine: Engine, oracle: Oracle) -> list[str]:
    """The bundle's graph config against the one the oracle checkpoint implies."""
    import dataclasses

    ckpt = oracle.checkpoint
    arch = ckpt.architecture
    expected = dataclasses.asdict(arch.config.from_hf(ckpt.text_config, ckpt.tie_word_embeddings))
    ours = engine.bundle.info.get("config", {})
    differ = [f"{k}={ours.get(k)!r} (oracle {v!r})" for k, v in expected.items() if ours.get(k) != v]
    differ += [f"{k} not in the oracle's config" for k in ours if k not in expected]
    if engine.bundle.info.get("architecture") != arch.name:
        differ.insert(0, f"architecture {engine.bundle.info.get('architecture')!r} (oracle {arch.name!r})")
    return [f"config differs from the oracle's: {', '.join(differ[:3])}"] if differ else []


def check_tokenizer(engine: Engine, oracle: Oracle, texts) -> list[str]:
    """The bundle's tokenizer must be the oracle's: same vocabulary and special tokens, same template, same ids."""
    ours, theirs = engine.tokenizer, oracle.tokenizer
    problems = []
    vocab_ours, vocab_theirs = ours.get_vocab(), theirs.get_vocab()
    if vocab_ours != vocab_theirs:
        differ = sorted(set(vocab_ours.items()) ^ set(vocab_theirs.items()), key=lambda kv: kv[1])
        token = differ[0][0]
        problems.append(f"{len(differ) // 2 or len(differ)} vocabulary entries differ "
                        f"(e.g. {token!r} -> {vocab_ours.get(token)} vs the oracle's {vocab_theirs.get(token)})")
    if getattr(ours, "chat_template", None) != getattr(theirs, "chat_template", None):
        problems.append("chat template differs")
    if ours.all_special_tokens != theirs.all_special_tokens:
        problems.append("special tokens differ")
    bad = [t for t in texts if ours.encode(t, add_special_tokens=False) != theirs.encode(t, add_special_tokens=False)]
    if bad:
        problems.append(f"{len(bad)} prompts encode differently (e.g. {bad[0][:30]!r})")
    return [f"tokenizer differs from the oracle's: {'; '.join(problems)}"] if problems else []


def _bundle_tensors(engine: Engine):
    from safetensors import safe_open

    path = engine.bundle.path / engine.bundle.info["weights"]
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            yield name, handle.get_tensor(name)


def check_weights(engine: Engine, oracle: Oracle) -> tuple[int, list[str]]:
    """Every tensor of the bundle against the recipe applied to the checkpoint's tensor, row by row.

    int8 rows must dequantize to the recipe's values within one int8 step of their block (absmax
    rounding is deterministic: a clean bundle is exact); float rows within one ulp of their dtype.
    Returns (tensors checked, descriptions of the bad ones)."""
    from ..models.linear import dequantize

    recipe = engine.bundle.info["quant"]
    source = oracle.text_parameters()
    tensors = dict(_bundle_tensors(engine))
    expected_names = {n for n in source if not (n == "lm_head.weight" and recipe.get("tied_head"))}
    bad, checked = [], 0
    for name in sorted(expected_names):
        module = name.removesuffix(".weight")
        if f"{module}.qweight" in tensors and name.endswith(".weight"):
            qweight, scales = tensors.pop(f"{module}.qweight"), tensors.pop(f"{module}.scales", None)
            if scales is None:
                bad.append(f"{module}.scales missing")
                continue
            ours = dequantize(qweight, scales, torch.float32)
            step = scales.float().repeat_interleave(qweight.shape[1] // scales.shape[1], dim=1)
            tol = 1.01 * step
        elif name in tensors:
            ours = tensors.pop(name).float()
            tol = None
        else:
            bad.append(f"{name} missing")
            continue
        checked += 1
        expected = quantized_like_bundle(name, source[name].data, recipe)
        if ours.shape != expected.shape:
            bad.append(f"{name} shape {tuple(ours.shape)} (oracle {tuple(expected.shape)})")
            continue
        if tol is None:  # float: one ulp of fp16 (fp32 params are exact)
            tol = expected.abs() * 2.0**-10 + 1e-7
        rows = ((ours - expected).abs() > tol).reshape(ours.shape[0], -1).any(-1) if ours.ndim else \
            ((ours - expected).abs() > tol).reshape(1)
        if rows.any():
            where = rows.nonzero().flatten().tolist()
            bad.append(f"{name} rows {where[:4]}{'...' if len(where) > 4 else ''}")
    for extra in sorted(tensors):
        bad.append(f"{extra} not in the oracle")
    return checked, bad


class QualitySums:
    """Running sums of the quantization figures (so a 248k vocabulary never holds every prompt's logits)."""

    def __init__(self) -> None:
        self.top1 = self.kl = self.top5 = 0.0
        self.count = 0

    def add(self, simulated: torch.Tensor, exact: torch.Tensor) -> None:
        self.top1 += float((simulated.argmax(-1) == exact.argmax(-1)).sum())
        logp, logq = exact.log_softmax(-1), simulated.log_softmax(-1)
        self.kl += float((logp.exp() * (logp - logq)).sum(-1).clamp_min(0).sum())
        k = min(5, exact.shape[-1])
        a, b = exact.topk(k, dim=-1).indices, simulated.topk(k, dim=-1).indices
        self.top5 += float((a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean(-1).sum())
        self.count += exact.shape[0]


def _encodings(name: str, weight: torch.Tensor, recipe: dict) -> list[list[bytes]]:
    """The byte strings the Core AI export of `name` holds, as alternatives: each alternative is a list of
    blobs that must all be present. int8 linears: qweight and fp16 scales as stored; fp16 weights as
    stored; fp32 parameters as stored, or folded the way the exported graph folds them (zero-centered
    norms as 1 + w, A_log as -exp(A_log), conv1d as its K tap columns)."""
    from ..bundle.quant import keeps_high_precision
    from ..models.linear import quantize_absmax

    def raw(t: torch.Tensor) -> bytes:
        return t.detach().contiguous().view(torch.uint8).numpy().tobytes()

    module = name.removesuffix(".weight")
    block = recipe.get("int8_linears", {}).get(module)
    if block:
        qweight, scales = quantize_absmax(weight.detach(), block)
        return [[raw(qweight), raw(scales)]]
    if not keeps_high_precision(name):
        return [[raw(weight.detach().to(torch.float16))]]
    w = weight.detach().float()
    options = [w, 1 + w, -w.exp()]
    out = [[raw(v.to(dtype))] for v in options for dtype in (torch.float32, torch.float16)]
    if name.endswith("conv1d.weight"):
        out += [[raw(w[:, 0, j].to(dtype)) for j in range(w.shape[-1])] for dtype in (torch.float32, torch.float16)]
    return out


def check_aimodel_weights(engine: Engine, oracle: Oracle) -> tuple[int, list[str]]:
    """Core AI runs the .aimodel, not the safetensors: each recipe tensor (the recipe applied to the
    checkpoint) must be in its bytecode byte for byte (MLIR keeps constants as raw blobs). Exact where
    fp16 logits resolve only ~0.2 std."""
    import mmap

    asset = engine.bundle.aimodel_path
    if asset is None or not (asset / "main.mlirb").is_file():
        return 0, []
    recipe = engine.bundle.info["quant"]
    source = oracle.text_parameters()
    bad, checked, seen = [], 0, set()
    with open(asset / "main.mlirb", "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for name, param in sorted(source.items()):
            if id(param) in seen and recipe.get("tied_head", True):  # a tied table is exported once
                continue
            seen.add(id(param))
            checked += 1
            if not any(all(data.find(blob) >= 0 for blob in option) for option in _encodings(name, param.data, recipe)):
                bad.append(name)
    return checked, bad


def check_quality(report: GateReport, pairs) -> list[str]:
    """Simulated vs fp32 oracle over all positions: top-1, mean KL(fp32 || simulated), top-5 overlap.
    `pairs`: (simulated, fp32) logits [S, V] pairs, or their `QualitySums`."""
    sums = pairs if isinstance(pairs, QualitySums) else QualitySums()
    if not isinstance(pairs, QualitySums):
        for simulated, exact in pairs:
            sums.add(simulated, exact)
    count = max(sums.count, 1)
    report.quality_top1, report.quality_kl, report.quality_top5 = sums.top1 / count, sums.kl / count, sums.top5 / count
    min_top1, max_kl, min_top5 = QUALITY.get(report.quant, QUALITY["int8hu"])
    failures = []
    if report.quality_top1 < min_top1:
        failures.append(f"quantization top-1 agreement {100 * report.quality_top1:.1f}% < {100 * min_top1:.0f}%")
    if report.quality_kl > max_kl:
        failures.append(f"quantization KL {report.quality_kl:.2e} > {max_kl:.0e}")
    if report.quality_top5 < min_top5:
        failures.append(f"quantization top-5 overlap {100 * report.quality_top5:.1f}% < {100 * min_top5:.0f}%")
    return failures


def _excluded_ids(engine: Engine) -> set[int]:
    """Token ids a text-only random prompt must not hold (a VLM's image / video placeholders)."""
    hf = engine.bundle.info.get("hf_config", {})
    return {hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if isinstance(hf.get(k), int)}


def default_coverage(engine: Engine) -> int:
    """Random-token ids fed by default: the whole vocabulary on PyTorch up to 8192 ids; 256 on Core AI
    (the Linux runtime is a slow reference interpreter; give --coverage for more)."""
    vocab = int(engine.bundle.info["config"]["vocab_size"])
    return min(vocab, 256 if engine.backend_name == "coreai" else 8192)


def run_gate(engine: Engine, oracle: Oracle, against: Engine | None = None, prompts=PROMPTS,
             coverage: int | None = None, simulated: Oracle | None = None, rollouts: int | None = None) -> GateReport:
    """Gate `engine` against `oracle` (fp32) and its simulated twin (built here unless given)."""
    info = engine.bundle.info
    quant = info["quant"]["mode"]
    compute = compute_dtype(engine)
    report = GateReport(engine.bundle.name, engine.backend_name, quant, compute=compute, bound=BOUNDS[compute],
                        prompts=len(prompts))
    failures = report.failures

    # 1-3: what the bundle is made of
    failures += check_config(engine, oracle)
    report.config_ok = not failures
    tokenizer_failures = check_tokenizer(engine, oracle, prompts)
    report.tokenizer_ok = not tokenizer_failures
    failures += tokenizer_failures
    simulated = simulated or oracle.simulated(info["quant"])
    if engine.bundle.info.get("weights"):  # a Core AI-only bundle has its weights in the .aimodel alone
        report.weights_checked, report.weights_bad = check_weights(engine, oracle)
    if report.weights_bad:
        failures.append("weights differ from the recipe applied to the checkpoint: "
                        f"{', '.join(report.weights_bad[:3])}")
    if engine.backend_name == "coreai":
        report.aimodel_checked, report.aimodel_bad = check_aimodel_weights(engine, oracle)
        if report.aimodel_bad:
            failures.append(f".aimodel weights differ from the recipe applied to the checkpoint: "
                            f"{', '.join(report.aimodel_bad[:3])}{'...' if len(report.aimodel_bad) > 3 else ''}")

    # 4-5: logits at every position, every vocabulary entry
    vocab = int(info["config"]["vocab_size"])
    texts = [oracle.tokenizer.encode(t, add_special_tokens=False) for t in prompts]
    randoms = random_prompts(vocab, default_coverage(engine) if coverage is None else coverage, _excluded_ids(engine))
    report.random_prompts = len(randoms)
    fed: set[int] = set()
    quality = QualitySums()
    seeded = []
    for k, ids in enumerate(texts + randoms):
        fed.update(ids)
        ours = _prompt_logits(engine, ids) if k < len(texts) else _chunk_logits(engine, ids)
        ref = simulated.forward(ids)
        error = relative_error(ours, ref.logits)
        if not torch.isfinite(ours).all():
            error = torch.full_like(error, math.inf)
        report.exact_worst = max(report.exact_worst, error.max().item())
        report.exact_worst_abs = max(report.exact_worst_abs, (ours - ref.logits).abs().max().item())
        report.exact_positions_over += int((error > report.bound).sum())
        report.positions += len(ids)
        exact = oracle.forward(ids).logits
        quality.add(ref.logits, exact)
        if k < len(texts):
            report.oracle_top1_last += int(ours[-1].argmax() == exact[-1].argmax())
            next_token = int(ref.top1[-1])
            step = _seeded_step(engine, ref.cache, ids, next_token)  # reads the cache before the oracle moves it
            expected = simulated.step(ref.cache, next_token)
            seeded.append((step, expected))
    report.vocab_covered = len(fed) / vocab
    for step, expected in seeded:
        report.seeded_worst = max(report.seeded_worst, relative_error(step, expected).max().item())
        cosine = torch.nn.functional.cosine_similarity(step, expected, dim=0).item()
        report.seeded_min_cosine = min(report.seeded_min_cosine, cosine)
    if report.exact_worst > report.bound:
        failures.append(f"logits differ from the simulated oracle: max|diff|/std {report.exact_worst:.3g} > "
                        f"{report.bound:g} at {report.exact_positions_over} of {report.positions} positions")
    if report.seeded_worst > report.bound:
        failures.append(f"oracle-seeded step max|diff|/std {report.seeded_worst:.3g} > {report.bound:g}")

    # 6: greedy rollouts, enforced against the simulated oracle
    matched = 0
    steps = ROLLOUT if rollouts is None else rollouts
    for ids in texts:
        mine = engine.complete(Request(ids, max_tokens=steps, ignore_eos=True)).tokens
        reference, logits = simulated.greedy_with_logits(ids, steps)
        matched += sum(a == b for a, b in zip(mine, reference))
        if mine == reference:
            report.rollout_identical += 1
            continue
        fork = next(i for i, (a, b) in enumerate(zip(mine, reference)) if a != b)
        top2 = logits[fork].topk(2)
        margin = float(top2.values[0] - top2.values[1])
        measured = min(report.exact_worst, report.bound)  # the error this run saw, never above the bound
        rank2 = top2.indices.tolist() == [reference[fork], mine[fork]]
        if rank2 and margin <= 2 * measured * float(logits[fork].std()):
            report.rollout_identical += 1
            report.rollout_excused += 1
    report.rollout_tokens_matched = matched / max(steps * len(texts), 1)
    n = len(texts)
    if report.rollout_identical < n:
        failures.append(f"greedy rollouts {report.rollout_identical}/{n} identical to the simulated oracle")
    if report.rollout_excused > max_excused(compute, n):
        failures.append(f"{report.rollout_excused} rollout forks excused as ties (at most {max_excused(compute, n)})")

    # B: the quantization itself
    failures += check_quality(report, quality)
    if against is not None:
        report.against = against.bundle.name
        for ids in texts:
            rollout = Request(ids, max_tokens=steps, ignore_eos=True)
            mine, theirs = engine.complete(rollout).tokens, against.complete(rollout).tokens
            if mine == theirs:
                report.against_identical += 1
            elif forks_at_tie(oracle, ids, mine, theirs) or forks_at_tie(oracle, ids, theirs, mine):
                report.against_identical += 1
                report.against_ties += 1
        if report.against_identical < n:
            failures.append(f"greedy rollouts {report.against_identical}/{n} identical to {report.against}")
        if report.against_ties > max_against_ties(n):
            failures.append(f"{report.against_ties} forks from {report.against} excused as ties "
                            f"(at most {max_against_ties(n)})")
    return report
