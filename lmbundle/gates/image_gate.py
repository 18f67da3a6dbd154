"""The image-prompt gate of VLM bundles (the seed's Qwen3-VL sweep), against the fp32 transformers oracle.

Fixed image prompts with pictures drawn here (so the gate needs no files): one at the encoder's size,
one stretched to it, two images in one prompt. For each:
1. positions: the graph's in-graph M-RoPE (t, h, w) equals transformers' `get_rope_index` everywhere;
2. vision: the bundle's encoder vs the oracle's vision tower on the same patches, per-token cosine of
   image (and DeepStack) embeddings >= 0.9997 (the seed's porting bound);
3. sweep: the bundle fed the prompt S=1 from a zero state, top-1 equal to the oracle's at the last 16
   positions (a flip where the oracle's top-2 margin is < 0.1 counts as a tie); min logits cosine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..engine.engine import Engine
from .gate import TIE_MARGIN, Report
from .oracle import Oracle

SWEEP = 16
VISION_MIN_COSINE = 0.9997
_SHAPES = (  # (box on a 448 canvas, colour)
    ((40, 60, 200, 220), (220, 40, 40)), ((240, 200, 420, 400), (40, 90, 220)), ((60, 300, 180, 420), (30, 170, 60)),
)


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic picture: a colour gradient with a few filled shapes (scaled to `size`)."""
    rng = np.random.default_rng(seed)
    width, height = size
    across = np.linspace(0, 1, width)[None, :, None] * rng.uniform(60, 255, 3)
    ramp = across + np.linspace(0, 1, height)[:, None, None] * 40
    image = Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for k, (box, colour) in enumerate(_SHAPES):
        box = [int(v * (width if i % 2 == 0 else height) / 448) for i, v in enumerate(box)]
        (draw.ellipse if (k + seed) % 2 else draw.rectangle)(box, fill=tuple(int(c) for c in np.roll(colour, seed)))
    return image


PROMPTS = (  # ((picture seed, size), ...), question
    (((0, (448, 448)),), "Describe the image."),
    (((1, (640, 480)),), "What colours and shapes do you see?"),
    (((2, (448, 448)), (3, (300, 500))), "What is different between the two pictures?"),
)


@dataclass
class ImageGateReport(Report):
    prompts: int = 0
    positions_exact: int = 0
    vision_min_cosine: float = 1.0
    sweep_top1: int = 0  # positions, over all prompts
    sweep_ties: int = 0
    sweep_positions: int = 0
    sweep_min_cosine: float = 1.0
    sweep_margins: list = field(default_factory=list)  # the oracle's top-2 logit margin at each sweep position

    @property
    def margin_min(self) -> float:
        return min(self.sweep_margins, default=0.0)

    @property
    def margin_median(self) -> float:
        return float(np.median(self.sweep_margins)) if self.sweep_margins else 0.0

    @property
    def margin_decided(self) -> float:
        """Share of sweep positions where top-1 is decided (margin >= the tie bound), not a coin toss."""
        return float(np.mean([m >= TIE_MARGIN for m in self.sweep_margins])) if self.sweep_margins else 0.0

    def lines(self) -> list[str]:
        ties = f" ({self.sweep_ties} ties)" if self.sweep_ties else ""
        return [
            f"  image prompts ({self.prompts}): M-RoPE positions == get_rope_index "
            f"{self.positions_exact}/{self.prompts}"
            f"   vision embeddings min cosine {self.vision_min_cosine:.6f}",
            f"  image sweep top-1 (last {SWEEP}, S=1) {self.sweep_top1}/{self.sweep_positions}{ties}"
            f"   min logits cosine {self.sweep_min_cosine:.6f}",
            f"  oracle top-2 margin at those positions: min {self.margin_min:.3f}, median {self.margin_median:.3f}, "
            f"{self.margin_decided:.0%} >= {TIE_MARGIN}",
        ]  # the verdict is the one line `gate.verdict` prints for text and image parts together


def _rope_positions(engine: Engine, ids: list[int]) -> torch.Tensor:
    """(t, h, w) [3, S] of a prompt as the decoder graph computes them in-graph, from the engine's
    active image context: the torch graph's own method, or on Core AI (whose graph runs inside the
    asset) the same shared method on the context the backend was handed."""
    from ..models.image_prompt import ImagePromptGraph

    model = getattr(engine.backend, "model", None)
    if model is None:
        cfg = type("Config", (), {"vocab_size": engine.vision.vocab_size})
        model = type("Host", (ImagePromptGraph,), {"cfg": cfg, "images": engine.vision.context})()
    device = engine.device
    return model.rope_positions(torch.tensor(ids, device=device), torch.arange(len(ids), device=device))


@torch.inference_mode()
def run_image_gate(engine: Engine, oracle: Oracle, prompts=PROMPTS) -> ImageGateReport:
    vision = engine.vision
    info = vision.info
    prompts = [p for p in prompts if len(p[0]) <= info.max_images]  # a one-image bundle skips the two-image one
    report = ImageGateReport(prompts=len(prompts))
    hf = oracle.model
    for pictures, question in prompts:
        images = [picture(seed, size) for seed, size in pictures]
        parts = vision.attach(images, notify=None)
        ids = engine.chat_ids([{"role": "user", "content": [*parts, {"type": "text", "text": question}]}])
        raw = torch.tensor([info.image_token_id if t >= vision.vocab_size else t for t in ids])
        patches = torch.cat([part["image"].patches for part in parts])
        grid_thw = torch.tensor([list(info.spec.grid_thw)] * len(parts))
        token_types = (raw == info.image_token_id).int()[None]

        # 1. positions
        vision.activate(ids)
        expected_positions, _ = hf.model.get_rope_index(raw[None], token_types, grid_thw)
        device = engine.device
        ours_positions = _rope_positions(engine, ids)
        report.positions_exact += int(torch.equal(ours_positions.cpu(), expected_positions[:, 0]))

        # 2. vision tower
        reference = hf.model.visual(patches, grid_thw=grid_thw)
        expected_embeds = [reference.pooler_output] + list(getattr(reference, "deepstack_features", None) or [])
        per_image = info.tokens_per_image
        for k, part in enumerate(parts):
            embeds, deepstack = vision.encode(part["image"])
            ours_levels = [embeds] + list(deepstack.split(per_image))
            for ours, theirs in zip(ours_levels, expected_embeds):
                theirs = theirs[k * per_image : (k + 1) * per_image]
                cosine = torch.nn.functional.cosine_similarity(ours.cpu(), theirs.float(), dim=-1).min().item()
                report.vision_min_cosine = min(report.vision_min_cosine, cosine)

        # 3. sweep
        logits = hf(input_ids=raw[None], pixel_values=patches, image_grid_thw=grid_thw,
                    mm_token_type_ids=token_types).logits[0, -SWEEP:].float()
        backend = engine.backend
        backend.reset(len(ids) + 1)
        ours = []
        for pos, token in enumerate(ids):
            handle = backend.step(torch.tensor([[token]], device=device), pos)
            if pos >= len(ids) - SWEEP:
                ours.append(backend.logits(handle))
        ours = torch.stack(ours)
        top2 = logits.topk(2, dim=-1).values
        same = ours.argmax(-1) == logits.argmax(-1)
        tie = ~same & ((top2[:, 0] - top2[:, 1]) < TIE_MARGIN)
        report.sweep_top1 += int((same | tie).sum())
        report.sweep_ties += int(tie.sum())
        report.sweep_positions += len(ours)
        report.sweep_margins += (top2[:, 0] - top2[:, 1]).tolist()
        cosine = torch.nn.functional.cosine_similarity(ours, logits, dim=-1).min().item()
        report.sweep_min_cosine = min(report.sweep_min_cosine, cosine)

    if report.positions_exact < report.prompts:
        report.failures.append(f"image: M-RoPE positions {report.positions_exact}/{report.prompts}")
    if report.vision_min_cosine < VISION_MIN_COSINE:
        report.failures.append(f"image: vision embeddings cosine {report.vision_min_cosine:.6f} < {VISION_MIN_COSINE}")
    if report.sweep_top1 < report.sweep_positions:
        report.failures.append(f"image: sweep top-1 {report.sweep_top1}/{report.sweep_positions}")
    return report
