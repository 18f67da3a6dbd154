"""The image-prompt gate of VLM bundles (the seed's Qwen3-VL sweep), against the fp32 transformers oracle
and the checkpoint's own image processor.

1. preprocessing: the bundle's recorded constants (size, mean/std, rescale, resampling filter, patch and
   merge sizes) equal the ones the checkpoint's processor config implies;
2. pixels: pictures of several sizes and modes through the bundle's image path (stretch to the fixed
   size, RGB, rescale, normalize, patchify) equal the checkpoint's image processor on the same picture
   stretched with the processor's own filter (its aspect-preserving resize is the one documented
   difference), then through the encoders: the bundle's on its patches vs the oracle's vision tower on
   the processor's, every level (DeepStack too) within `VISION_BOUND` of the oracle's spread;
3. positions: the graph's in-graph M-RoPE (t, h, w) equals transformers' `get_rope_index`;
4. sweep: fixed image prompts (pictures drawn here, so the gate needs no files) fed S=1 from a zero
   state, top-1 equal to the oracle's (fed the processor's pixels) at the last 16 positions (a flip where
   the oracle's top-2 margin is < 0.1 counts as a tie).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..bundle.vision import ImageSpec
from ..convert.vision_export import image_spec_of
from ..engine.engine import Engine
from ..errors import LmbundleError
from .gate import TIE_MARGIN, Progress, Report
from .oracle import Oracle

SWEEP = 16
VISION_MIN_COSINE = 0.9997
VISION_BOUND = 0.05  # max |bundle - oracle| / std(oracle), vision embeddings (fp16 weights: clean 0.0015-0.0022)
PIXEL_TOLERANCE = 1e-5  # the same float32 arithmetic in another order
_SHAPES = (  # (box on a 448 canvas, colour)
    ((40, 60, 200, 220), (220, 40, 40)), ((240, 200, 420, 400), (40, 90, 220)), ((60, 300, 180, 420), (30, 170, 60)),
)
PICTURES = ((0, None, "RGB"), (1, (640, 480), "RGB"), (2, (300, 500), "RGBA"), (3, (97, 61), "RGB"))  # None: the fixed size


def picture(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A deterministic picture: a colour gradient with a few filled shapes (scaled to `size`); RGBA ones
    get a transparent corner."""
    rng = np.random.default_rng(seed)
    width, height = size
    across = np.linspace(0, 1, width)[None, :, None] * rng.uniform(60, 255, 3)
    ramp = across + np.linspace(0, 1, height)[:, None, None] * 40
    image = Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for k, (box, colour) in enumerate(_SHAPES):
        box = [int(v * (width if i % 2 == 0 else height) / 448) for i, v in enumerate(box)]
        (draw.ellipse if (k + seed) % 2 else draw.rectangle)(box, fill=tuple(int(c) for c in np.roll(colour, seed)))
    if mode == "RGBA":
        image = image.convert("RGBA")
        alpha = np.full((height, width), 255, np.uint8)
        alpha[: height // 3, : width // 3] = 40
        image.putalpha(Image.fromarray(alpha))
    return image


PROMPTS = (  # ((picture seed, size), ...), question
    (((0, (448, 448)),), "Describe the image."),
    (((1, (640, 480)),), "What colours and shapes do you see?"),
    (((2, (448, 448)), (3, (300, 500))), "What is different between the two pictures?"),
)


@dataclass
class ImageGateReport(Report):
    prompts: int = 0
    preprocessing_ok: bool = True
    pictures: int = 0
    pixels_worst: float = 0.0  # max |bundle patches - processor's pixel_values|
    vision_worst: float = 0.0  # max |diff| / std of the embeddings, every level
    vision_min_cosine: float = 1.0
    positions_exact: int = 0
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
            f"  image preprocessing {'== the checkpoint processor' if self.preprocessing_ok else 'DIFFERS'}: "
            f"{self.pictures} pictures, patches max|diff| {self.pixels_worst:.2g} (max {PIXEL_TOLERANCE:g}); "
            f"vision embeddings max|diff|/std {self.vision_worst:.3g} (bound {VISION_BOUND:g}), "
            f"min cosine {self.vision_min_cosine:.6f}",
            f"  image prompts ({self.prompts}): M-RoPE positions == get_rope_index {self.positions_exact}/{self.prompts}"
            f"   sweep top-1 (last {SWEEP}, S=1) {self.sweep_top1}/{self.sweep_positions}{ties}"
            f"   min logits cosine {self.sweep_min_cosine:.6f}",
            f"  oracle top-2 margin at those positions: min {self.margin_min:.3f}, median {self.margin_median:.3f}, "
            f"{self.margin_decided:.0%} >= {TIE_MARGIN}",
        ]  # the verdict is the one line `gate.verdict` prints for text and image parts together


class ProcessorPixels:
    """The checkpoint's image processor on a picture stretched to the bundle's fixed size with the
    processor's own resampling filter."""

    def __init__(self, oracle: Oracle, side: int):
        from transformers import AutoImageProcessor

        path = oracle.checkpoint.path
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(path))
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise LmbundleError(f"{path}: cannot load the checkpoint's image processor ({reason})") from None
        self.side = side

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.image_transforms import convert_to_rgb

        rgb = Image.fromarray(convert_to_rgb(image, return_numpy=True))
        if rgb.size != (self.side, self.side):
            rgb = rgb.resize((self.side, self.side), resample=self.processor.resample)
        out = self.processor(images=rgb, do_resize=False, return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"]


def _check_spec(engine: Engine, expected: ImageSpec) -> list[str]:
    ours = dataclasses.asdict(engine.vision.info.spec)
    differ = [f"{key} {ours[key]} (checkpoint {value})" for key, value in dataclasses.asdict(expected).items()
              if not np.allclose(ours[key], value, rtol=1e-6, atol=0)]
    return [f"image: preprocessing differs from the checkpoint's processor: {', '.join(differ)}"] if differ else []


@torch.inference_mode()
def _check_pixels(engine: Engine, oracle: Oracle, reference: ProcessorPixels, report: ImageGateReport) -> None:
    """Pictures through the bundle's image path and encoder vs the processor's pixels and the oracle's tower."""
    vision = engine.vision
    for seed, size, mode in PICTURES:
        image = picture(seed, size or (reference.side, reference.side), mode)
        report.pictures += 1
        patches, grid_thw = reference(image)
        prepared = vision.prepare(image)
        if prepared.patches.shape != patches.shape:
            report.pixels_worst = float("inf")
            continue
        report.pixels_worst = max(report.pixels_worst, (prepared.patches - patches).abs().max().item())
        embeds, deepstack = vision.encode(prepared)
        expected = oracle.model.model.visual(patches, grid_thw=grid_thw)
        levels = zip([embeds, *deepstack.split(embeds.shape[0])],
                     [expected.pooler_output, *(getattr(expected, "deepstack_features", None) or [])])
        for ours, theirs in levels:
            ours, theirs = ours.cpu().float(), theirs.float()
            report.vision_worst = max(report.vision_worst, (ours - theirs).abs().max().item() / theirs.std().item())
            cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min().item()
            report.vision_min_cosine = min(report.vision_min_cosine, cosine)


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
def run_image_gate(engine: Engine, oracle: Oracle, prompts=PROMPTS, log=None) -> ImageGateReport:
    progress = Progress(log)
    vision = engine.vision
    info = vision.info
    prompts = [p for p in prompts if len(p[0]) <= info.max_images]  # a one-image bundle skips the two-image one
    report = ImageGateReport(prompts=len(prompts))
    hf = oracle.model
    progress("image: preprocessing and the vision encoder from pixels")
    expected = image_spec_of(oracle.checkpoint.path)  # the fixed size our convert derives from the processor's
    spec_failures = _check_spec(engine, expected)
    report.preprocessing_ok = not spec_failures
    reference = ProcessorPixels(oracle, expected.image_size)
    _check_pixels(engine, oracle, reference, report)
    for k, (pictures, question) in enumerate(prompts, 1):
        progress(f"image prompt {k}/{len(prompts)}: positions and the S=1 sweep")
        images = [picture(seed, size) for seed, size in pictures]
        parts = vision.attach(images, notify=None)
        ids = engine.chat_ids([{"role": "user", "content": [*parts, {"type": "text", "text": question}]}])
        raw = torch.tensor([info.image_token_id if t >= vision.vocab_size else t for t in ids])
        processed = [reference(image) for image in images]
        patches = torch.cat([p for p, _ in processed])
        grid_thw = torch.cat([g for _, g in processed])
        token_types = (raw == info.image_token_id).int()[None]
        if int(token_types.sum()) * info.spec.merge_size**2 != int(grid_thw.prod(-1).sum()):
            report.failures.append(f"image: the bundle's image tokens do not match the checkpoint processor's "
                                   f"grid {grid_thw[0].tolist()}")
            report.prompts = k - 1  # the prompts after it cannot be compared either
            break

        vision.activate(ids)
        expected_positions, _ = hf.model.get_rope_index(raw[None], token_types, grid_thw)
        report.positions_exact += int(torch.equal(_rope_positions(engine, ids).cpu(), expected_positions[:, 0]))

        logits = hf(input_ids=raw[None], pixel_values=patches, image_grid_thw=grid_thw,
                    mm_token_type_ids=token_types).logits[0, -SWEEP:].float()
        backend = engine.backend
        backend.reset(len(ids) + 1)
        ours = []
        for pos, token in enumerate(ids):
            handle = backend.step(torch.tensor([[token]], device=engine.device), pos)
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

    report.failures += spec_failures
    if not report.pixels_worst <= PIXEL_TOLERANCE:
        report.failures.append(f"image: the bundle's patches differ from the checkpoint's processor by "
                               f"{report.pixels_worst:.3g} (max {PIXEL_TOLERANCE:g})")
    if not report.vision_worst <= VISION_BOUND or report.vision_min_cosine < VISION_MIN_COSINE:
        report.failures.append(f"image: vision embeddings from pixels max|diff|/std {report.vision_worst:.3g} "
                               f"(bound {VISION_BOUND:g}), cosine {report.vision_min_cosine:.6f} (min {VISION_MIN_COSINE})")
    if report.positions_exact < report.prompts:
        report.failures.append(f"image: M-RoPE positions {report.positions_exact}/{report.prompts}")
    if report.sweep_top1 < report.sweep_positions:
        report.failures.append(f"image: sweep top-1 {report.sweep_top1}/{report.sweep_positions}")
    progress("image: done")
    return report
