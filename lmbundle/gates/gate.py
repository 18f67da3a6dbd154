"""`lmbundle gate`: the reasons to trust a bundle, measured against the fp32 transformers oracle.

Two questions, answered separately:

A. Is the bundle exactly the quantized model it declares? Reference: the *simulated* oracle
   (`Oracle.simulated`), transformers fp32 with the recipe of the bundle's declared mode applied to
   the checkpoint's weights.
   1. config == the checkpoint's; recipe == the one the declared mode implies (`weights.py`);
      tokenizer and generation config == the checkpoint's (`tokenizer.py`).
   2. every weight tensor, row by row (decoder and vision encoder), within one int8 step / one fp16
      ulp; on Core AI every constant each `.aimodel` function reads, at its place (`aimodel.py`).
   3. logits on every vocabulary entry at every position of a few long prompts, on every path the
      bundle computes them by (`paths.py`: S=1, chunked, the prompt path with its states against
      the oracle's cache, a step seeded from the oracle's cache), and of random-token prompts
      covering the vocabulary: max |logit diff| / std(oracle logits) <= the backend's arithmetic bound.
   4. greedy rollouts (the bundle's own token choice, to its stop ids) equal to the simulated
      oracle's along the way; a fork is excused only where the oracle's margin between its top-1 and
      the bundle's token is under twice the bound (two logits each off by at most d swap only when
      closer than 2d): the same rule on every backend, no count.
B. Is the quantization good enough? Simulated vs fp32 oracle over the same positions: top-1
   agreement where the fp32 oracle decides, mean KL(fp32 || simulated) and top-5 overlap against
   per-mode thresholds (`quality.py`).
   With `--against` (e.g. the fp16 bundle) the rollouts must also equal that bundle's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..engine.engine import Engine
from ..engine.request import Request
from .oracle import Oracle
from .paths import run_paths
from .quality import QUALITY, TIE_MARGIN, check_quality
from .tokenizer import check_generation_config, check_tokenizer
from .weights import check_aimodel, check_config, check_vision_weights, check_weights, expected_recipe

ROLLOUT = 32
RANDOM_PROMPT = 257  # random-token prompts: 4 Core AI prompt-function chunks of 64 and one step
PROMPTS = (  # long enough for the prompt paths' chunks of 64 on the demo's tokenizer (77-85 tokens)
    "KING HENRY:\nNow, lords, what news? Our cousin of Burgundy is come, and the French king would speak "
    "with us before the sun goes down. Go, call the lords together, and let the heralds proclaim our coming "
    "through the city, that every man may know the king is here.\n\nGLOUCESTER:\nMy liege,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter. Every "
    "morning they rowed out before the sun was up, and every evening they came home with their nets full of "
    "silver fish. One day a stranger in a grey cloak came to their door and asked",
    "The capital of France is Paris, and the capital of Italy is Rome. To make a cup of tea, first boil the "
    "water, then pour it over the leaves and wait three minutes. The river ran through the forest, past the "
    "old mill and under the stone bridge, until at last it reached",
)
CHAT_PROMPT = "Tell me about love."  # through the chat template: the rollout ends at the turn's end

# Bound on max_v |bundle - simulated oracle| / std_v(simulated oracle) at any position, and on the states,
# by the arithmetic the backend computes in (`compute_dtype`); docs/gates.md has the clean figures.
BOUNDS = {"fp32": 1e-3, "fp16": 0.15, "bf16": 0.5}


def compute_dtype(engine: Engine) -> str:
    """The float type a backend computes in: Core AI fp16; PyTorch fp32 on the CPU, bf16 on CUDA, fp16 on MPS."""
    if engine.backend_name == "coreai":
        return "fp16"
    return {"cuda": "bf16", "mps": "fp16"}.get(engine.device.type, "fp32")


class Progress:
    """The gate's steps as it goes, one line each (`log` None: silent)."""

    def __init__(self, log=None):
        self.log, self.start = log, time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.log is not None:
            self.log(f"gate [{time.perf_counter() - self.start:6.1f} s] {message}")


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
    vocab_covered: float = 0.0  # fraction of token ids fed to the bundle
    config_ok: bool = True
    recipe_ok: bool = True
    tokenizer_ok: bool = True
    generation_ok: bool = True
    weights_checked: int = 0
    weights_bad: list[str] = field(default_factory=list)
    vision_checked: int = 0
    vision_bad: list[str] = field(default_factory=list)
    aimodel_reads: dict[str, int] = field(default_factory=dict)  # Core AI: weight reads checked per function
    aimodel_bad: list[str] = field(default_factory=list)
    paths: dict[str, float] = field(default_factory=dict)  # worst max|diff|/std of the logits per path
    states: dict[str, float] = field(default_factory=dict)  # worst max|diff|/std per state after the prompt path
    exact_worst: float = 0.0  # over every path's logits
    exact_worst_abs: float = 0.0
    exact_positions_over: int = 0
    seeded_min_cosine: float = 1.0
    rollout_identical: int = 0  # rollouts equal to the simulated oracle's (forks within the bound allowed)
    rollout_excused: int = 0  # forks where the oracle's margin is under twice the bound
    excused_margins: list[float] = field(default_factory=list)  # their margins, in std of the oracle's logits
    rollout_forks: list[str] = field(default_factory=list)  # forks beyond it
    rollout_tokens: int = 0
    quality_top1: float = 1.0  # at the positions the fp32 oracle decides (top-2 margin >= TIE_MARGIN)
    quality_decided: float = 1.0  # their share
    quality_kl: float = 0.0
    quality_top5: float = 1.0
    oracle_top1_last: int = 0  # the bundle's top-1 == the fp32 oracle's at each prompt's last position
    against: str | None = None
    against_identical: int = 0
    against_ties: int = 0

    @property
    def state_worst(self) -> float:
        return max(self.states.values(), default=0.0)

    def lines(self) -> list[str]:
        n = self.prompts
        thresholds = QUALITY.get(self.quant, QUALITY["int8hu"])
        same = {True: "== oracle", False: "DIFFERS"}
        weights = (f"{self.weights_checked} tensors" + (f" + vision {self.vision_checked}" if self.vision_checked else "")
                   + " == the recipe applied to the checkpoint" if not (self.weights_bad or self.vision_bad)
                   else f"{len(self.weights_bad + self.vision_bad)} tensors differ "
                   f"({', '.join((self.weights_bad + self.vision_bad)[:3])})")
        lines = [
            f"gate  {self.bundle}  [{self.quant}, {self.backend} backend, {self.compute} compute]",
            f"  config {same[self.config_ok]}   recipe {'== declared mode' if self.recipe_ok else 'DIFFERS'}   "
            f"tokenizer {same[self.tokenizer_ok]}   generation config {same[self.generation_ok]}",
            f"  weights: {weights}",
        ]
        if self.aimodel_reads:
            reads = ", ".join(f"{name} {count}" for name, count in self.aimodel_reads.items())
            lines.append(f"  .aimodel: {sum(self.aimodel_reads.values()) - len(self.aimodel_bad)}/"
                         f"{sum(self.aimodel_reads.values())} weight reads equal to the recipe, in place ({reads})")
        path_figures = "   ".join(f"{name} {value:.3g}" for name, value in self.paths.items())
        states = "   states " + ", ".join(f"{k} {v:.3g}" for k, v in self.states.items()) if self.states else ""
        lines += [
            f"  exactness vs simulated oracle ({n} prompts + {self.random_prompts} random-token prompts, "
            f"{self.positions} positions, {100 * self.vocab_covered:.0f}% of ids fed), max|diff|/std "
            f"(bound {self.bound:g}; worst abs {self.exact_worst_abs:.3g}):",
            f"    {path_figures}{states}   seeded cos {self.seeded_min_cosine:.6f}",
            f"    greedy rollouts (<= {ROLLOUT}, to a stop id): {self.rollout_identical}/{n} equal to the simulated "
            f"oracle's ({self.rollout_excused} forks within twice the bound"
            + (f": margins {', '.join(f'{m:.3g}' for m in self.excused_margins)} std" if self.excused_margins else "")
            + f"; {self.rollout_tokens} tokens)",
            f"  quantization vs fp32 oracle: top-1 {100 * self.quality_top1:.2f}% where decided "
            f"({100 * self.quality_decided:.0f}% of positions; min {100 * thresholds[0]:.1f}%)   "
            f"KL {self.quality_kl:.2e} (max {thresholds[1]:.0e})   top-5 overlap {100 * self.quality_top5:.2f}% "
            f"(min {100 * thresholds[2]:.1f}%)   last-token top-1 {self.oracle_top1_last}/{n}",
        ]
        if self.against:
            lines.append(f"  greedy rollouts vs {self.against}: {self.against_identical}/{n} identical"
                         + (f" ({self.against_ties} forks at fp32-oracle ties)" if self.against_ties else ""))
        return lines


def verdict(*reports: Report | None) -> str:
    """The one verdict line of a gate run (text and image parts together)."""
    failures = [f for report in reports if report is not None for f in report.failures]
    return "PASS" if not failures else "FAIL: " + "; ".join(failures)


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


def _excluded_ids(engine: Engine) -> set[int]:
    """Token ids a text-only random prompt must not hold (a VLM's image / video placeholders)."""
    hf = engine.bundle.info.get("hf_config", {})
    return {hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if isinstance(hf.get(k), int)}


def default_coverage(engine: Engine) -> int:
    """Random-token ids fed by default: the whole vocabulary on PyTorch up to 8192 ids; one prompt on Core
    AI (through its prompt function: the states after it are compared; the `.aimodel` check reads every row)."""
    vocab = int(engine.bundle.info["config"]["vocab_size"])
    return min(vocab, RANDOM_PROMPT if engine.backend_name == "coreai" else 8192)


def gate_sequences(oracle: Oracle, prompts, chat: str | None = CHAT_PROMPT) -> list[list[int]]:
    """The text prompts as the oracle's tokenizer encodes them, and the chat prompt through its template."""
    tokenizer = oracle.tokenizer
    sequences = [tokenizer.encode(text, add_special_tokens=False) for text in prompts]
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": chat}], tokenize=False,
                                             add_generation_prompt=True)
        sequences.append(tokenizer.encode(text, add_special_tokens=False))
    return sequences


def run_gate(engine: Engine, oracle: Oracle, against: Engine | None = None, prompts=PROMPTS,
             coverage: int | None = None, simulated: Oracle | None = None, rollouts: int | None = None,
             chat: str | None = CHAT_PROMPT, log=None) -> GateReport:
    """Gate `engine` against `oracle` (fp32) and the simulated oracle of its declared mode (built here
    unless given); `log` gets a line per step as it goes."""
    progress = Progress(log)
    bundle = engine.bundle
    compute = compute_dtype(engine)
    report = GateReport(bundle.name, engine.backend_name, bundle.info["quant"]["mode"], compute=compute,
                        bound=BOUNDS[compute])
    failures = report.failures

    progress("config, recipe, tokenizer, generation config")
    found = check_config(bundle, oracle)
    report.config_ok = not found
    recipe, recipe_failures = expected_recipe(bundle, oracle)
    report.recipe_ok = not recipe_failures
    sequences = gate_sequences(oracle, prompts, chat)
    texts = [oracle.tokenizer.decode(ids) for ids in sequences]
    tokenizer_failures = check_tokenizer(engine, oracle, texts)
    report.tokenizer_ok = not tokenizer_failures
    generation_failures = check_generation_config(engine, oracle)
    report.generation_ok = not generation_failures
    failures += found + recipe_failures + tokenizer_failures + generation_failures

    progress("weights, row by row")
    if bundle.info.get("weights"):  # a Core AI-only bundle has its weights in the .aimodel alone
        report.weights_checked, report.weights_bad = check_weights(bundle, oracle, recipe)
    report.vision_checked, report.vision_bad = check_vision_weights(bundle, oracle)
    bad = report.weights_bad + report.vision_bad
    if bad:
        failures.append(f"weights differ from the recipe applied to the checkpoint: {', '.join(bad[:3])}"
                        + ("..." if len(bad) > 3 else ""))
    if engine.backend_name == "coreai":
        progress(".aimodel: each function's weights, in place")
        for function in check_aimodel(bundle, oracle, recipe):
            report.aimodel_reads[function.name] = function.expected
            wrong = [f"{name} misplaced" for name in function.misplaced] + [f"{name} differs" for name in function.differ]
            report.aimodel_bad += [f"{function.name}: {item}" for item in wrong]
        if report.aimodel_bad:
            failures.append(f".aimodel weights differ from the recipe applied to the checkpoint: "
                            f"{', '.join(report.aimodel_bad[:3])}{'...' if len(report.aimodel_bad) > 3 else ''}")

    simulated = simulated or oracle.simulated(recipe)
    vocab = int(bundle.info["config"]["vocab_size"])
    budget = default_coverage(engine) if coverage is None else coverage
    randoms = random_prompts(vocab, budget, _excluded_ids(engine))
    report.prompts, report.random_prompts = len(sequences), len(randoms)
    steps = ROLLOUT if rollouts is None else rollouts
    quality = run_paths(engine, oracle, simulated, report, sequences, randoms, steps, progress)

    failures += check_quality(report, quality)
    if against is not None:
        progress(f"rollouts vs {against.bundle.name}")
        report.against = against.bundle.name
        for ids in sequences:
            rollout = Request(ids, max_tokens=steps)
            mine, theirs = engine.complete(rollout).tokens, against.complete(rollout).tokens
            if mine == theirs:
                report.against_identical += 1
            elif forks_at_tie(oracle, ids, mine, theirs) or forks_at_tie(oracle, ids, theirs, mine):
                report.against_identical += 1
                report.against_ties += 1
        if report.against_identical < len(sequences):
            failures.append(f"greedy rollouts {report.against_identical}/{len(sequences)} identical to {report.against}")
    progress("done")
    return report

