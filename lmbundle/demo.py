"""`make demo`: the whole product on the embedded small model, start to finish.

Converts the shipped demo checkpoints (small Qwen3.5 and Qwen3-VL models trained by
scripts/train_demo_model.py) to fp16 and int8hu bundles (PyTorch weights + Core AI .aimodel), gates
them against the fp32 transformers oracle, answers a chat prompt on both backends, answers an image
prompt and prints the speed.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import LmbundleError

DEMO_DIR = Path(__file__).parent / "data" / "demo"
PROMPT = "Tell me a short story about a king and his three sons."

# ----------------------------------------------------------------------------- pictures
# The demo VLM (scripts/train_demo_model.py) learned these pictures: one filled shape of one of four
# colours on a plain background of another colour, at any position and size, in images of several
# sizes and aspect ratios. Training, `make demo`, the accuracy test and the browser test all draw here.

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (240, 210, 30)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
BACKGROUNDS = {
    "white": (255, 255, 255), "light grey": (200, 200, 200), "grey": (128, 128, 128),
    "dark grey": (60, 60, 60), "black": (0, 0, 0), "cream": (245, 238, 210), "lavender": (200, 185, 235),
    "pink": (250, 200, 215), "brown": (115, 75, 45), "purple": (100, 45, 125),
}
# (question, answer template): what the demo VLM was taught to answer about a picture.
QUESTIONS = (
    ("What is in the image?", "A {colour} {shape}."),
    ("What do you see?", "A {colour} {shape}."),
    ("Describe the image.", "A {colour} {shape} on the {side}."),
    ("What colour is the shape?", "{Colour}."),
    ("What shape is it?", "A {shape}."),
    ("Is it on the left or the right?", "On the {side}."),
)


@dataclass(frozen=True)
class Scene:
    """What a drawn picture shows (the answers' ground truth)."""

    colour: str
    shape: str
    side: str
    background: str
    size: tuple[int, int]  # (width, height)

    def answer(self, template: str) -> str:
        return template.format(colour=self.colour, Colour=self.colour.capitalize(), shape=self.shape,
                               side=self.side)


def draw_scene(rng: random.Random, colour: str | None = None, shape: str | None = None,
               side: str | None = None, size: tuple[int, int] | None = None):
    """(PIL image, Scene): one shape, its colour jittered, on a plain background, clearly in the
    left or the right half; the image 96..512 pixels wide with an aspect ratio of 1:2..2:1."""
    from PIL import Image, ImageDraw

    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    side = side or rng.choice(SIDES)
    background = rng.choice(list(BACKGROUNDS))
    if size is None:
        width = rng.randint(96, 512)
        height = min(640, max(96, round(width / 2 ** rng.uniform(-1, 1))))
        size = (width, height)
    width, height = size
    extent = min(0.8 * width, rng.uniform(0.3, 0.7) * min(width, height))  # the shape's side (or diameter)
    half = extent / 2
    low, high = half, max(half, width / 2 - 0.08 * width)  # the centre's x range in the left half
    cx = rng.uniform(low, high)
    if side == "right":
        cx = width - cx
    cy = rng.uniform(half, height - half)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image, Scene(colour, shape, side, background, size)


def named(answer: str, words) -> list[str]:
    """The words of `words` that an answer names (lower case)."""
    text = answer.lower()
    return [w for w in words if w in text]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmbundle.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo", help="where the demo bundles are written")
    parser.add_argument("--backend", default="all", help="bundle backends to build (all | torch)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="keep the libraries' known-harmless warnings and log lines (lmbundle/quiet.py)")
    args = parser.parse_args(argv)
    from .quiet import quiet

    quiet(args.verbose)
    try:
        run(Path(args.out), args.backend)
    except LmbundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run(out: Path, backend: str) -> None:
    from .bundle.format import open_bundle
    from .convert.convert import convert
    from .engine.bench import bench, format_bench
    from .engine.engine import Engine
    from .engine.request import Request
    from .gates.gate import run_gate, verdict
    from .gates.oracle import Oracle

    checkpoint = DEMO_DIR / "qwen35-tiny"
    shutil.rmtree(out, ignore_errors=True)
    bundles = {}
    print(f"Converting the demo Qwen3.5 ({checkpoint.relative_to(DEMO_DIR.parents[1])}) into {out}/")
    for quant in ("fp16", "int8hu"):
        bundles[quant] = convert(str(checkpoint), out / f"qwen35-tiny-{quant}", quant=quant, backend=backend, log=None)
        info = open_bundle(bundles[quant]).info
        print(f"  {quant}: {info['size_on_disk'] / 1e6:.2f} MB on disk, "
              f"{info['bytes_per_token']['total_at_empty_context'] / 1e6:.2f} MB read per token")

    oracle = Oracle(str(checkpoint))
    fp16, int8hu = Engine(bundles["fp16"]), Engine(bundles["int8hu"])
    passed = True
    for engine, against in ((fp16, None), (int8hu, fp16)):
        report = run_gate(engine, oracle, against)
        print("\n".join(report.lines() + [verdict(report)]))
        passed &= report.passed

    ids = int8hu.chat_ids([{"role": "user", "content": PROMPT}])
    print(f"\nuser: {PROMPT}\nassistant: ", end="", flush=True)
    print(int8hu.complete(Request(ids, max_tokens=60)).text, "\n")
    if open_bundle(bundles["int8hu"]).aimodel_path:
        passed &= compare_backends(bundles["int8hu"], int8hu, oracle, ids)
    print(format_bench(bench(int8hu, prompt_tokens=64, gen_tokens=128, trials=3)))
    passed &= image_demo(out)
    if not passed:
        raise SystemExit(1)


def compare_backends(bundle: Path, torch_engine, oracle, ids: list[int], tokens: int = 32) -> bool:
    """The shipped .aimodel on the Core AI runtime must produce PyTorch's tokens (a fork is accepted only
    where the oracle itself is at a top-2 tie, the gates' rule)."""
    from .engine.engine import Engine
    from .engine.request import Request
    from .gates.gate import forks_at_tie

    coreai = Engine(bundle, backend="coreai")
    request = Request(ids, max_tokens=tokens, ignore_eos=True)
    ours, theirs = torch_engine.complete(request).tokens, coreai.complete(request).tokens
    del coreai
    gc.collect()  # freed while its event loop runs: freed at interpreter exit, the Core AI runtime can abort
    if ours == theirs:
        print(f"Core AI runtime on the shipped .aimodel: the same {tokens} tokens as PyTorch\n")
        return True
    fork = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    tie = forks_at_tie(oracle, ids, ours, theirs) or forks_at_tie(oracle, ids, theirs, ours)
    print(f"Core AI runtime on the shipped .aimodel: the same tokens as PyTorch up to token {fork}, "
          + ("where the oracle's top-2 margin is < 0.1 (a tie)\n" if tie else "then DIFFERENT\n"))
    return tie


# (colour, shape, side, size) of the pictures `make demo` draws, and the second question each gets
DEMO_PICTURES = (
    (("blue", "triangle", "left", (320, 240)), "What colour is the shape?"),
    (("yellow", "circle", "right", (200, 360)), "Is it on the left or the right?"),
    (("red", "square", "right", (480, 300)), "What shape is it?"),
)
DEMO_SEED = 7  # the background, jitter, position and size; training drew with other seeds


def image_demo(out: Path) -> bool:
    """The VLM path: the demo Qwen3-VL as an int8hu bundle (decoder + vision encoder), its image gate
    against the oracle, then questions about pictures drawn now (saved next to the bundles)."""
    from .convert.convert import convert
    from .engine.engine import Engine
    from .engine.request import Request
    from .gates.gate import verdict
    from .gates.image_gate import run_image_gate
    from .gates.oracle import Oracle

    checkpoint = DEMO_DIR / "qwen3vl-tiny"
    print(f"\nConverting the demo Qwen3-VL ({checkpoint.relative_to(DEMO_DIR.parents[1])}) into {out}/")
    bundle = convert(str(checkpoint), out / "qwen3vl-tiny-int8hu", quant="int8hu", backend="torch", log=None)
    report = run_image_gate(Engine(bundle, backend="torch"), Oracle(str(checkpoint)))  # leaves inference-mode state
    print(f"gate  {bundle.name}  [int8hu, torch backend, image prompts]")
    print("\n".join(report.lines() + [verdict(report)]))
    engine = Engine(bundle, backend="torch")
    side = engine.vision.info.spec.image_size
    folder = out / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nPictures drawn just now (not seen in training), in {folder}/; the encoder sees each "
          f"stretched to {side}x{side}:")
    rng = random.Random(DEMO_SEED)
    right = asked = 0
    for number, ((colour, shape, where, size), question) in enumerate(DEMO_PICTURES, 1):
        image, scene = draw_scene(rng, colour, shape, where, size)
        path = folder / f"{number}-{colour}-{shape}.png"
        image.save(path)
        print(f"\n[{path.name}: {size[0]}x{size[1]}, a {colour} {shape} on the {where}, {scene.background} background]")
        for q in ("What is in the image?", question):
            template = dict(QUESTIONS)[q]
            ids = engine.chat_ids([{"role": "user", "content": [{"type": "image", "image": image},
                                                                  {"type": "text", "text": q}]}])
            answer = engine.complete(Request(ids, max_tokens=16)).text.strip()
            ok = answer == scene.answer(template)
            right, asked = right + ok, asked + 1
            print(f"user: {q}\nassistant: {answer}" + ("" if ok else f"   (expected: {scene.answer(template)})"))
    print(f"\n{right}/{asked} answers about the pictures right\n")
    return report.passed


if __name__ == "__main__":
    main()
