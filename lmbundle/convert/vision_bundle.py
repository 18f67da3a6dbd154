"""The vision half of an image-text bundle: `vision.safetensors` and the `vision` section of metadata.json.

One bundle folder carries both halves; Apple's LanguageBundle loader accepts an optional top-level
`vision` key, so the section lives there. It records everything the runtime needs to turn an image
into decoder inputs (fixed grid, patch/merge sizes, mean/std, image token ids, how many images a
prompt may hold, the encoder's config and output shapes), so loading never reads the checkpoint's
configs again and nothing is guessed from tensor shapes. The weights are the encoder's own, fp16 by
default whatever the decoder's quant mode (the seeds quantize the decoder only); their sha256 goes
into `lmbundle.files` with every other file of the bundle.

Where Core AI export is available the section also names a `NAME.vision.aimodel`: the encoder as one
static function `main`, `patches` [784, 1536] fp32 in, `image_embeds` / `deepstack_embeds` fp32 out
(the seed's vision contract), computed at the weights' dtype.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..errors import LmbundleError
from ..quiet import python_stdout_filtered
from .image import ImageSpec

if TYPE_CHECKING:
    from ..models.vision import VisionEncoder
    from .bundle import Bundle
    from .checkpoint import Checkpoint

VISION_WEIGHTS = "vision.safetensors"
DEFAULT_MAX_IMAGES = 4  # image slots of the decoder's fixed ImageContext (4 x 196 tokens)
_TOKEN_KEYS = ("image_token_id", "vision_start_token_id", "vision_end_token_id")


def write_vision(
    checkpoint: "Checkpoint", folder: Path, text_hidden: int, dtype: torch.dtype = torch.float16,
    max_images: int = DEFAULT_MAX_IMAGES, image_size: int | None = None, asset: str | None = None,
) -> dict[str, Any]:
    """Write the checkpoint's vision encoder to `folder/vision.safetensors` (and the Core AI `asset`,
    a `.aimodel` folder name, when given); returns the metadata section."""
    from ..models.vision import load_vision_encoder

    spec = ImageSpec.from_checkpoint(checkpoint.path, image_size)
    tokens = {key: checkpoint.config.get(key) for key in _TOKEN_KEYS}
    missing = [key for key, value in tokens.items() if not isinstance(value, int)]
    if missing:
        raise LmbundleError(f"{checkpoint.path / 'config.json'}: no {', '.join(missing)} (needed for image prompts)")
    if max_images < 1:
        raise LmbundleError(f"max_images must be at least 1, not {max_images}")
    encoder = load_vision_encoder(checkpoint, spec.grid_side, torch.float32).to(dtype)
    config = encoder.config
    if config.out_hidden_size != text_hidden:
        raise LmbundleError(
            f"{checkpoint.path}: vision out_hidden_size {config.out_hidden_size} != text hidden_size {text_hidden}"
        )
    tensors = {name: t.contiguous() for name, t in encoder.state_dict().items()}
    save_file(tensors, str(folder / VISION_WEIGHTS), metadata={"format": "pt", "lmbundle": __version__})
    if asset:
        export_vision_aimodel(encoder, folder / asset)
    per_image = spec.num_tokens
    num_deepstack = len(config.deepstack_visual_indexes)
    merged = spec.grid_side // spec.merge_size
    return {
        "weights": VISION_WEIGHTS,
        "asset": asset,
        "dtype": str(dtype).removeprefix("torch."),
        "image_size": spec.image_size,
        "grid_thw": list(spec.grid_thw),
        "merged_grid": [merged, merged],
        "tokens_per_image": per_image,
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.merge_size,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "rescale_factor": spec.rescale_factor,
        "resample": spec.resample,
        **tokens,
        "max_images": max_images,
        "out_hidden_size": config.out_hidden_size,
        "num_deepstack": num_deepstack,
        "encoder": dataclasses.asdict(config),
        "inputs": {"patches": [spec.num_patches, spec.patch_dim]},
        "outputs": {"image_embeds": [per_image, config.out_hidden_size],
                    "deepstack_embeds": [num_deepstack * per_image, config.out_hidden_size]},
    }


@dataclass(frozen=True)
class VisionInfo:
    """The `vision` section of a bundle, read back."""

    spec: ImageSpec
    encoder_config: dict[str, Any]
    weights: Path
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    max_images: int
    out_hidden_size: int
    num_deepstack: int
    merged_grid: tuple[int, int]

    @property
    def tokens_per_image(self) -> int:
        return self.merged_grid[0] * self.merged_grid[1]


def read_vision(bundle: "Bundle") -> VisionInfo | None:
    """The bundle's vision section, or None for a text-only bundle."""
    section = bundle.metadata.get("vision")
    if section is None:
        return None
    where = bundle.path / "metadata.json"
    try:
        spec = ImageSpec(
            patch_size=section["patch_size"], temporal_patch_size=section["temporal_patch_size"],
            merge_size=section["merge_size"], mean=tuple(section["image_mean"]), std=tuple(section["image_std"]),
            rescale_factor=section["rescale_factor"], resample=section["resample"], image_size=section["image_size"],
        )
        info = VisionInfo(
            spec=spec, encoder_config=dict(section["encoder"]), weights=bundle.path / section["weights"],
            image_token_id=section["image_token_id"], vision_start_token_id=section["vision_start_token_id"],
            vision_end_token_id=section["vision_end_token_id"], max_images=section["max_images"],
            out_hidden_size=section["out_hidden_size"], num_deepstack=section["num_deepstack"],
            merged_grid=tuple(section["merged_grid"]),
        )
    except (KeyError, TypeError) as exc:
        raise LmbundleError(f"{where}: incomplete vision section ({exc})") from None
    if not info.tokens_per_image == spec.num_tokens == section.get("tokens_per_image", spec.num_tokens):
        raise LmbundleError(f"{where}: vision section disagrees with itself (grid vs tokens per image)")
    return info


def load_bundle_encoder(
    bundle: "Bundle", info: VisionInfo, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> "VisionEncoder":
    """Build the encoder from the vision section and load `vision.safetensors` (sha256-checked)."""
    from ..models.vision import VisionConfig, VisionEncoder
    from .checkpoint import load_weights

    if verify:
        bundle.verify([str(info.weights.relative_to(bundle.path))])
    fields = dict(info.encoder_config)
    fields["deepstack_visual_indexes"] = tuple(fields.get("deepstack_visual_indexes") or ())
    try:
        config = VisionConfig(**fields)
    except TypeError as exc:
        raise LmbundleError(f"{bundle.path / 'metadata.json'}: bad vision encoder config ({exc})") from None
    encoder = VisionEncoder(config, info.spec.grid_side)
    try:
        with safe_open(str(info.weights), framework="pt") as handle:
            load_weights(encoder, ((k, handle.get_tensor(k)) for k in handle.keys()), info.weights)
    except LmbundleError:
        raise
    except Exception as exc:
        raise LmbundleError(f"{info.weights}: unreadable vision weights ({str(exc).splitlines()[0][:200]})") from None
    return encoder.to(device=device, dtype=dtype).eval()


class VisionGraph(nn.Module):
    """The exported function: fp32 patches in, fp32 embeddings out, whatever the weights' dtype."""

    def __init__(self, encoder: "VisionEncoder"):
        super().__init__()
        self.encoder = encoder

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeds, deepstack_embeds = self.encoder(patches)
        return image_embeds.float(), deepstack_embeds.float()


def export_vision_aimodel(encoder: "VisionEncoder", out_path: Path) -> Path:
    """Write the encoder as a Core AI `.aimodel` folder (static shapes: one image on the fixed grid)."""
    try:
        with warnings.catch_warnings():  # "only validated with torch<=2.13.0; found 2.13.0+cpu"
            warnings.simplefilter("ignore")
            import coreai_torch
    except ImportError as exc:
        raise LmbundleError("Core AI export needs coreai-torch: pip install 'lmbundle[coreai]'") from exc
    config = encoder.config
    patches = torch.zeros(encoder.grid_side**2, config.patch_dim)
    with torch.no_grad():
        exported = torch.export.export(VisionGraph(encoder).eval(), (patches,), strict=False)
    exported = exported.run_decompositions(coreai_torch.get_decomp_table())
    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    converter.add_exported_program(exported, input_names=["patches"],
                                   output_names=["image_embeds", "deepstack_embeds"])
    with python_stdout_filtered():  # its "converting 1 program(s)" line (lmbundle/quiet.py)
        program = converter.to_coreai()
    program.save_asset(Path(out_path))
    return Path(out_path)
