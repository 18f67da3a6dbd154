"""`lmbundle gate`: the reasons to trust a bundle, measured against the fp32 transformers oracle.

1. teacher-forced single-step top-1: the bundle is fed each of 16 fixed prompts one token at a time
   (S=1, from a zero state); its top-1 after the last prompt token must equal the oracle's (16/16; a flip
   where the oracle's top-2 margin is < 0.1 counts as a tie). The agreement over every prompt position
   is reported too.
2. a decode step seeded from the oracle's own cache after each prompt: top-1 equal, logits cosine.
3. greedy rollouts of 32 tokens: identical to the oracle (fp16 bundles) or to `--against` (int8); a
   rollout that forks where the oracle's top-2 margin on the shared prefix is < 0.1, between those
   two tokens, counts as a tie (reported), as in 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..bundle.load import state_spec
from ..engine.engine import Engine
from ..engine.sampling import Sampling
from .oracle import Oracle, state_from_cache

TIE_MARGIN = 0.1
ROLLOUT = 32
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
    teacher_forced_top1: int = 0
    teacher_forced_ties: int = 0
    prompts: int = 0
    all_position_agreement: float = 0.0
    seeded_step_top1: int = 0
    seeded_step_min_cosine: float = 1.0
    rollout_reference: str = "oracle"
    rollout_identical: int = 0
    rollout_ties: int = 0
    rollout_tokens_matched: float = 0.0
    rollout_enforced: bool = True
    worst_logit_diff: float = 0.0

    def lines(self) -> list[str]:
        n = self.prompts
        ties = f" ({self.rollout_ties} fork at an oracle tie)" if self.rollout_ties else ""
        rollout = f"{self.rollout_identical}/{n} identical to {self.rollout_reference}{ties}" + (
            "" if self.rollout_enforced else " (reported only: give --against FP16_BUNDLE to enforce)"
        )
        return [
            f"gate  {self.bundle}  [{self.quant}, {self.backend} backend]",
            f"  teacher-forced top-1     {self.teacher_forced_top1}/{n}"
            + (f" ({self.teacher_forced_ties} ties)" if self.teacher_forced_ties else "")
            + f"   all-position agreement {100 * self.all_position_agreement:.1f}%",
            f"  oracle-seeded step top-1 {self.seeded_step_top1}/{n}   min logits cosine {self.seeded_step_min_cosine:.6f}",
            f"  greedy rollouts ({ROLLOUT})   {rollout}   token agreement {100 * self.rollout_tokens_matched:.1f}%",
            f"  worst |logit diff| vs oracle {self.worst_logit_diff:.3g}",
            "PASS" if self.passed else "FAIL: " + "; ".join(self.failures),
        ]


def _prompt_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position, the bundle fed S=1 from a zero state."""
    backend = engine.backend
    backend.reset(len(ids) + 1)
    rows = []
    for pos, token in enumerate(ids):
        handle = backend.step(torch.tensor([[token]], device=engine.device), pos)
        rows.append(backend.logits(handle))
    return torch.stack(rows)


def _seeded_step(engine: Engine, cache, ids: list[int], token: int) -> torch.Tensor:
    backend = engine.backend
    backend.reset(len(ids) + 1)
    spec = state_spec(engine.bundle)
    backend.load_state(lambda state: state_from_cache(cache, spec, state))
    return backend.logits(backend.step(torch.tensor([[token]], device=engine.device), len(ids)))


def forks_at_tie(oracle: Oracle, ids: list[int], mine: list[int], reference: list[int]) -> bool:
    """Whether two greedy paths part where the oracle itself can hardly choose (top-2 margin < 0.1
    on the shared prefix): the same tie rule as the teacher-forced gate, applied at the fork."""
    fork = next(i for i, (a, b) in enumerate(zip(mine, reference)) if a != b)
    logits = oracle.forward(ids + reference[:fork]).logits[-1]
    top2 = logits.topk(2)
    tie = top2.values[0] - top2.values[1] < TIE_MARGIN
    return bool(tie) and {mine[fork], reference[fork]} <= set(top2.indices.tolist())


def run_gate(engine: Engine, oracle: Oracle, against: Engine | None = None, prompts=PROMPTS) -> GateReport:
    quant = engine.bundle.info["quant"]["mode"]
    report = GateReport(engine.bundle.name, engine.backend_name, quant, prompts=len(prompts))
    agree = total = 0
    rollout_match = 0
    for text in prompts:
        ids = engine.encode(text)
        ref = oracle.forward(ids)
        ours = _prompt_logits(engine, ids)
        report.worst_logit_diff = max(report.worst_logit_diff, (ours - ref.logits).abs().max().item())
        same = ours.argmax(-1) == ref.top1
        agree += int(same.sum())
        total += len(ids)
        if same[-1]:
            report.teacher_forced_top1 += 1
        elif ref.margin[-1] < TIE_MARGIN:
            report.teacher_forced_top1 += 1
            report.teacher_forced_ties += 1

        next_token = int(ref.top1[-1])
        seeded = _seeded_step(engine, ref.cache, ids, next_token)  # reads the cache before the oracle moves it
        expected = oracle.step(ref.cache, next_token)
        report.seeded_step_top1 += int(seeded.argmax() == expected.argmax())
        cosine = torch.nn.functional.cosine_similarity(seeded, expected, dim=0).item()
        report.seeded_step_min_cosine = min(report.seeded_step_min_cosine, cosine)

        mine = list(engine.generate(ids, ROLLOUT, Sampling(), stop=False))
        reference = list(against.generate(ids, ROLLOUT, Sampling(), stop=False)) if against else oracle.greedy(ids, ROLLOUT)
        if mine == reference:
            report.rollout_identical += 1
        elif forks_at_tie(oracle, ids, mine, reference):
            report.rollout_identical += 1
            report.rollout_ties += 1
        rollout_match += sum(a == b for a, b in zip(mine, reference))
    report.all_position_agreement = agree / max(total, 1)
    report.rollout_tokens_matched = rollout_match / (ROLLOUT * len(prompts))
    if against:
        report.rollout_reference = against.bundle.name
    report.rollout_enforced = against is not None or quant == "fp16"

    n = len(prompts)
    if report.teacher_forced_top1 < n:
        report.failures.append(f"teacher-forced top-1 {report.teacher_forced_top1}/{n}")
    if report.seeded_step_top1 < n:
        report.failures.append(f"oracle-seeded step top-1 {report.seeded_step_top1}/{n}")
    if report.rollout_enforced and report.rollout_identical < n:
        report.failures.append(f"greedy rollouts {report.rollout_identical}/{n} identical")
    return report
