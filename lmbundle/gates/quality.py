"""Part B of the gate: is the quantization good enough? The simulated oracle (the recipe applied to the
checkpoint) against the fp32 oracle over every position of the gate's sequences: top-1 agreement where
the fp32 oracle's top-1 is decided (its top-2 margin >= `TIE_MARGIN`: elsewhere either token is a coin
toss, and a random-weight model has almost nothing else), mean KL(fp32 || simulated) and top-5 overlap,
against per-mode thresholds set from the clean figures (docs/gates.md)."""

from __future__ import annotations

import torch

TIE_MARGIN = 0.1  # fp32-oracle top-2 margin under which two tokens are a tie (the seeds' sweep rule)

# (min top-1 agreement where decided, max mean KL in nats, min top-5 overlap) on the default gate: the worst
# clean figure of the demo, random and fresh-init checkpoints (docs/gates.md) with its deficit or KL doubled
# (a deficit at least 0.05 %). Clean worst: fp16 100 %, 8.7e-7, 99.86 %; int8 99.90 %, 3.6e-4, 98.72 %.
QUALITY = {
    "fp16": (0.999, 2e-6, 0.997),
    "int8lin": (0.998, 8e-4, 0.974),
    "int8hu": (0.998, 8e-4, 0.974),
}


class QualitySums:
    """Running sums of the quantization figures (so a 248k vocabulary never holds every prompt's logits)."""

    def __init__(self) -> None:
        self.top1 = self.kl = self.top5 = 0.0
        self.count = self.decided = 0

    def add(self, simulated: torch.Tensor, exact: torch.Tensor) -> None:
        top2 = exact.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) >= TIE_MARGIN
        self.top1 += float(((simulated.argmax(-1) == exact.argmax(-1)) & decided).sum())
        self.decided += int(decided.sum())
        logp, logq = exact.log_softmax(-1), simulated.log_softmax(-1)
        self.kl += float((logp.exp() * (logp - logq)).sum(-1).clamp_min(0).sum())
        k = min(5, exact.shape[-1])
        a, b = exact.topk(k, dim=-1).indices, simulated.topk(k, dim=-1).indices
        self.top5 += float((a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean(-1).sum())
        self.count += exact.shape[0]


def check_quality(report, pairs) -> list[str]:
    """Simulated vs fp32 oracle (`pairs`: (simulated, fp32) logits [S, V] pairs, or their `QualitySums`);
    sets the report's quality figures, returns the failures."""
    sums = pairs if isinstance(pairs, QualitySums) else QualitySums()
    if not isinstance(pairs, QualitySums):
        for simulated, exact in pairs:
            sums.add(simulated, exact)
    if not sums.count:
        return []  # nothing fed (a gate of the static checks only)
    report.quality_top1 = sums.top1 / sums.decided if sums.decided else 1.0
    report.quality_kl, report.quality_top5 = sums.kl / sums.count, sums.top5 / sums.count
    report.quality_decided = sums.decided / sums.count
    min_top1, max_kl, min_top5 = QUALITY.get(report.quant, QUALITY["int8hu"])
    failures = []
    if report.quality_top1 < min_top1:
        failures.append(f"quantization top-1 agreement {100 * report.quality_top1:.2f}% < {100 * min_top1:.1f}% "
                        f"(at the {sums.decided} positions the fp32 oracle decides)")
    if report.quality_kl > max_kl:
        failures.append(f"quantization KL {report.quality_kl:.2e} > {max_kl:.0e}")
    if report.quality_top5 < min_top5:
        failures.append(f"quantization top-5 overlap {100 * report.quality_top5:.2f}% < {100 * min_top5:.1f}%")
    return failures
