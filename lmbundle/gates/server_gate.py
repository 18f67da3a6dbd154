"""`lmbundle gate --server URL --oracle CHECKPOINT`: does a running OpenAI-compatible server compute the
checkpoint it claims to serve?

No bundle is read: the server is asked for greedy rollouts with the log-probabilities of each chosen token
and of its top alternatives (chat text through /v1/chat/completions, random-token prompts through
/v1/completions where the server takes token ids), and the fp32 oracle is run once over each prompt plus the
server's own tokens (teacher-forced along the server's path), so every generated position is checked, also
after the server's path parts from the oracle's; positions whose entries the server left out (llama-server's,
for tokens that end inside a UTF-8 character) are asked for again one at a time (`server_gaps`). Per position,
in units of the std of the oracle's logits there (the bundle gate's unit, so a bound means the same on a tiny
model and a real one):
  error     max |server log-prob - oracle log-prob| over the entries the server returned;
  gap       the oracle's top-1 log-prob minus that of the server's token (0 where they agree).
Two log-probabilities each within a bound b can swap only where their gap is under 2b, so a position's
deviation is max(error, gap / 2) and a fork is excused only where the oracle's margin is that close. The worst
deviation and the mean over all positions are held to the bounds of the server's precision class (`BOUNDS`):
given with --precision, else read from the model's name (q8_0, int8, bf16, awq...), else inferred as the
tightest class the figures fit. Also checked: the server's
prompt token count (`usage.prompt_tokens`) against the oracle's chat template and the token-id prompts, and
where the server stopped on its own, that the oracle's top-1 there is a stop token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import LmbundleError
from .gate import RANDOM_PROMPT, Report, random_prompts
from .oracle import Oracle
from .server_client import Completion, Server
from .server_gaps import GapFiller
from .server_tokens import TokenTable

ROLLOUT = 32
RANDOM_PROMPTS = 4
# Many short chat prompts: each rollout is checked at every generated position, and a server costs an HTTP
# call a prompt (the bundle gate's few long prompts exist for its chunked paths). The bounds below were
# measured over these.
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
LOGPROB_FLOOR = -1000.0  # servers clamp -inf (ours at -9999): such entries say nothing about the model

# Bounds on the deviation (std of the oracle's logits), worst position and mean over positions, by the class
# of weights and arithmetic the server runs, loosest last. Clean worst / mean measured on the demo model
# (docs/gates.md, "Gating a server"): fp32 llama-server F32 with fp32 KV, no flash attention 1.2e-5 / 2.3e-6;
# fp16 ours 0.0023 / 0.0005, llama-server F16 0.0043 / 0.0009; bf16 llama-server BF16 (CPU) 0.030 / 0.006,
# ours on CUDA ~0.14 (the bundle gate's figure); int8 ours int8hu 0.050 / 0.013, llama-server Q8_0 0.104 /
# 0.021; 4bit llama-server Q4_0 1.17 / 0.20 (a 192-wide model: 4-bit's worst case). The worst bounds are
# 3.5-5x the worst clean figure (2.5x for 4bit), the mean bounds ~5x (3x); a server of another checkpoint
# measures 6.0 / 4.0.
BOUNDS = {"fp32": (1e-3, 2e-4), "fp16": (0.2, 0.04), "bf16": (0.5, 0.1), "int8": (0.5, 0.1), "4bit": (3.0, 0.6)}
PRECISIONS = tuple(BOUNDS)
# what a model's name says about its weights (lowercase; a hint must not follow a letter or digit)
NAME_HINTS = [
    ("4bit", r"q[2-6]|iq[1-4]|int4|4bit|4-bit|w4a(8|16)|awq|gptq|nf4|mxfp4|fp4|bnb"),
    ("int8", r"q8|int8|8bit|8-bit|w8a(8|16)|fp8"),
    ("bf16", r"bf16|bfloat16"),
    ("fp16", r"f16|fp16|float16|half"),
]


def declared_precision(model: str, card: dict) -> str | None:
    """The precision class a model's name declares, or None. Our own server computes in bf16 on CUDA."""
    name = model.lower()
    found = next((cls for cls, hint in NAME_HINTS if re.search(rf"(?<![a-z0-9])({hint})", name)), None)
    ours_on_cuda = card.get("owned_by") == "lmbundle" and str(card.get("device", "")).startswith("cuda")
    return "bf16" if found == "fp16" and ours_on_cuda else found


@dataclass
class Position:
    error: float  # std units
    error_abs: float  # nats
    gap: float  # std units; 0 where the server chose the oracle's top-1
    entries: int
    where: str


@dataclass
class ServerGateReport(Report):
    server: str
    model: str = ""
    precision: str = ""
    precision_source: str = ""
    bound: float = 0.0
    mean_bound: float = 0.0
    top_logprobs: dict = field(default_factory=dict)
    chat_prompts: int = 0
    random_prompts: int = 0
    token_prompts: str = ""  # "" taken; else why not
    positions: int = 0
    entries: int = 0
    agreed: int = 0
    forks_excused: int = 0
    forks_clear: int = 0
    first_clear_fork: str = ""
    worst: float = 0.0
    worst_abs: float = 0.0
    worst_at: str = ""
    mean: float = 0.0
    generated: int = 0  # tokens the server generated
    unchecked: int = 0  # of them, those past an entry the gate could not place (an unknown id, an entry left out)
    left_out: int = 0  # of them, those the server listed no logprob entry for
    left_out_rollouts: int = 0  # rollouts with fewer logprob entries than generated tokens
    filled: int = 0  # positions left out that the gate asked for again (and checks)
    fill_refused: str = ""  # why the server cannot fill them, where it left entries out
    template_checked: int = 0
    template_matched: int = 0
    template_mismatch: str = ""
    token_prompt_mismatch: str = ""

    def lines(self) -> list[str]:
        top = ", ".join(f"{k} {v}" for k, v in self.top_logprobs.items())
        token_prompts = (f"{self.random_prompts} random-token prompts of {RANDOM_PROMPT}" if not self.token_prompts
                         else f"no token-id prompts ({self.token_prompts})")
        unchecked = (f"; {self.unchecked} of {self.generated} generated tokens not checked" if self.unchecked
                     else "")
        refused = f": the server {self.fill_refused}" if self.fill_refused else ""
        left_out = (f"  logprobs left out for {self.left_out} of {self.generated} generated tokens (in "
                    f"{self.left_out_rollouts} rollouts); {self.filled} asked for again one at a time{refused}")
        return [
            f"gate --server {self.server}  model {self.model!r}  [{self.precision}: {self.precision_source}]",
            f"  {self.chat_prompts} chat prompts + {token_prompts}; top_logprobs {top}; {self.positions} positions, "
            f"{self.entries} log-probs compared{unchecked}",
            *([left_out] if self.left_out else []),
            f"  chat template: prompt tokens == oracle's {self.template_matched}/{self.template_checked}"
            + (f" (first: {self.template_mismatch})" if self.template_mismatch else ""),
            f"  greedy tokens == oracle top-1 {self.agreed}/{self.positions}; forks at near-ties {self.forks_excused}, "
            f"at clear margins {self.forks_clear}" + (f" (first: {self.first_clear_fork})" if self.forks_clear else ""),
            f"  log-prob deviation: worst {self.worst:.3g} std (bound {self.bound:g}; {self.worst_abs:.3g} nats; "
            f"at {self.worst_at or '-'})   mean {self.mean:.3g} std (bound {self.mean_bound:g})",
        ]


def run_server_gate(server: Server, oracle: Oracle, precision: str | None = None, prompts=PROMPTS,
                    random: int = RANDOM_PROMPTS, steps: int = ROLLOUT,
                    progress: Callable[[str], None] = lambda line: None) -> ServerGateReport:
    """Gate the model `server` serves against `oracle` (fp32). `server.connect()` must have run."""
    report = ServerGateReport(server.base, server.model or "", chat_prompts=len(prompts))
    tokenizer = oracle.tokenizer
    table = TokenTable(tokenizer)
    filler = GapFiller(server, table)
    stops = stop_ids(oracle)
    positions: list[Position] = []

    def check(label: str, ids: list[int], completion: Completion) -> None:
        left_out, filled = max((completion.generated or 0) - len(completion.path), 0), filler.filled
        if left_out:
            table.resolve_path(completion.path, completion.text)
            completion = _ask(server, lambda: filler.fill(ids, completion))
            report.left_out, report.left_out_rollouts = report.left_out + left_out, report.left_out_rollouts + 1
        found, unchecked = teacher_forced(oracle, table, ids, completion, stops, label)
        positions.extend(found)
        report.unchecked += unchecked
        report.generated += max(completion.generated or 0, len(completion.path))
        worst = max((max(p.error, p.gap / 2) for p in found), default=0.0)
        forks = sum(p.gap > 0 for p in found)
        holes = f" ({filler.filled - filled} of {left_out} left out asked for again)" if left_out else ""
        progress(f"  {label}: {len(found)} positions{holes}, {forks} forks, worst {worst:.3g} std")

    for k, text in enumerate(prompts):
        ids = chat_ids(tokenizer, text)
        completion = _ask(server, lambda: server.chat(text, steps))
        report.template_checked += completion.prompt_tokens is not None
        if completion.prompt_tokens is not None:
            if completion.prompt_tokens == len(ids):
                report.template_matched += 1
            elif not report.template_mismatch:
                report.template_mismatch = (f"chat {k + 1}: the server's prompt is {completion.prompt_tokens} tokens, "
                                            f"the oracle's template renders {len(ids)}")
        check(f"chat {k + 1}/{len(prompts)}", ids, completion)

    vocab = min(len(tokenizer), int(oracle.model.get_output_embeddings().weight.shape[0]))
    randoms = random_prompts(vocab, random * RANDOM_PROMPT, table.added) if random else []
    if randoms:
        report.token_prompts = _ask(server, lambda: server.refuses_token_ids(randoms[0][:8]))
    if randoms and not report.token_prompts:
        report.random_prompts = len(randoms)
        for k, ids in enumerate(randoms):
            completion = _ask(server, lambda: server.complete(ids, steps))
            if completion.prompt_tokens not in (None, len(ids)) and not report.token_prompt_mismatch:
                report.token_prompt_mismatch = (f"the server counted {completion.prompt_tokens} prompt tokens for "
                                                f"{len(ids)} token ids")
            check(f"random {k + 1}/{len(randoms)}", ids, completion)
    report.top_logprobs = dict(server.top)
    report.filled, report.fill_refused = filler.filled, filler.refusal or ""
    return decide(report, positions, precision, declared_precision(server.model or "", server.card))


def _ask(server: Server, request):
    """A request the gate needs; a failure the user cannot fix by a flag ends the gate with what the server said."""
    try:
        return request()
    except server.api_error as exc:
        raise LmbundleError(server.describe_error(exc)) from None


def chat_ids(tokenizer, text: str) -> list[int]:
    """The oracle's chat template around one user message, as the server should render it."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def stop_ids(oracle: Oracle) -> set[int]:
    """Tokens a server may stop on: the generation config's eos ids and the tokenizer's special tokens."""
    config = getattr(oracle.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids = set([eos] if isinstance(eos, int) else eos or [])
    return ids | set(oracle.tokenizer.all_special_ids)


@torch.inference_mode()
def teacher_forced(oracle: Oracle, table: TokenTable, ids: list[int], completion: Completion, stops: set[int],
                   label: str) -> tuple[list[Position], int]:
    """The positions of one rollout, the oracle run once over the prompt and the server's tokens, and the count
    of generated tokens past the last one the server's entries place."""
    path = completion.path
    table.resolve_path(path, completion.text)
    left_out = max((completion.generated or 0) - len(path), 0)
    tokens = []
    for entry in path:
        if entry.id is None:
            break
        # a hole left unfilled: the next entry carries the held-back bytes, and the path is known up to there
        if left_out and entry.raw is not None and entry.raw != table.bytes[entry.id]:
            break
        tokens.append(entry.id)
    unchecked = len(path) + left_out - len(tokens)
    stopped = completion.finish == "stop" and stops and not unchecked and not (tokens and tokens[-1] in stops)
    if not tokens and not stopped:
        return [], unchecked
    logits = oracle.forward(ids + tokens).logits[len(ids) - 1:].double()
    logprobs, spread = logits.log_softmax(-1), logits.std(-1).clamp_min(1e-6)
    out = []
    for t, entry in enumerate(path[: len(tokens)]):
        row, std = logprobs[t], float(spread[t])
        compared = [abs(e.logprob - float(row[e.id])) for e in [entry, *entry.top]
                    if e.id is not None and math.isfinite(e.logprob) and e.logprob > LOGPROB_FLOOR]
        error = max(compared, default=0.0)
        gap = float(row.max() - row[entry.id]) / std
        out.append(Position(error / std, error, gap, len(compared), f"{label} token {t + 1}"))
    if stopped:  # the server stopped on a token it did not list: the oracle must rank a stop token first
        row, std = logprobs[len(tokens)], float(spread[len(tokens)])
        best = max(float(row[i]) for i in stops if i < row.numel())
        out.append(Position(0.0, 0.0, float(row.max() - best) / std, 0, f"{label} stop after {len(tokens)} tokens"))
    return out, unchecked


def decide(report: ServerGateReport, positions: list[Position], precision: str | None,
           declared: str | None) -> ServerGateReport:
    """The class's bounds, the figures and the failures."""
    deviation = [max(p.error, p.gap / 2) for p in positions]
    worst, mean = max(deviation, default=0.0), sum(deviation) / max(len(deviation), 1)
    if precision:
        report.precision, report.precision_source = precision, "declared with --precision"
    elif declared:
        report.precision, report.precision_source = declared, f"declared by the model's name {report.model!r}"
    else:
        fits = [c for c in PRECISIONS if worst <= BOUNDS[c][0] and mean <= BOUNDS[c][1]]
        report.precision = fits[0] if fits else PRECISIONS[-1]
        report.precision_source = "inferred from the figures (--precision to require a class)"
    bound, mean_bound = report.bound, report.mean_bound = BOUNDS[report.precision]
    report.positions = len(positions)
    report.entries = sum(p.entries for p in positions)
    report.agreed = sum(p.gap == 0 for p in positions)
    report.forks_excused = sum(0 < p.gap <= 2 * bound for p in positions)
    clear = [p for p in positions if p.gap > 2 * bound]
    report.forks_clear = len(clear)
    if clear:
        report.first_clear_fork = f"{clear[0].where}, oracle margin {clear[0].gap:.3g} std"
    if positions:
        report.worst, report.mean, report.worst_at = worst, mean, positions[deviation.index(worst)].where
        report.worst_abs = max(p.error_abs for p in positions)
    failures = report.failures
    if not positions or 2 * report.unchecked > report.generated:
        failures.append(cannot_check(report))
    if report.template_mismatch:
        differ = report.template_checked - report.template_matched
        failures.append(f"chat template: {differ} of {report.template_checked} prompts differ in length from the "
                        f"oracle's ({report.template_mismatch})")
    if report.token_prompt_mismatch:
        failures.append(f"token-id prompts: {report.token_prompt_mismatch}")
    if clear:
        failures.append(f"{len(clear)} of {len(positions)} greedy tokens are not the oracle's top-1 where its margin "
                        f"is clear (first: {report.first_clear_fork})")
    over = sum(p.error > bound for p in positions)
    if over:
        failures.append(f"log-probs differ from the oracle's by up to {max(p.error for p in positions):.3g} std > "
                        f"{bound:g} ({report.precision}) at {over} of {len(positions)} positions")
    if mean > mean_bound:
        failures.append(f"mean deviation {mean:.3g} std > {mean_bound:g} ({report.precision})")
    return report


def cannot_check(report: ServerGateReport) -> str:
    """Why the gate cannot vouch for a server whose answers let it check fewer than half its tokens."""
    checked = f"{report.generated - report.unchecked} of {report.generated} generated tokens could be checked"
    if report.fill_refused:
        return (f"cannot check: the server lists no logprobs for {report.left_out} of {report.generated} generated "
                f"tokens and {report.fill_refused}; {checked}")
    if report.left_out:
        why = f"the server lists no logprobs for {report.left_out} of them, and its answers did not fill the holes"
    elif report.unchecked:
        why = "the logprob entries name tokens the oracle's tokenizer does not have"
    else:
        why = "the server generated none"
    return f"cannot check: only {checked} ({why})"
