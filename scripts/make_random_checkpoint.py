"""A random-weight checkpoint of a real Qwen3.5 config, built by transformers' own classes, for size and
memory runs of `lmbundle convert` (no download is possible here).

    .venv/bin/python scripts/make_random_checkpoint.py Qwen3.5-2B /tmp/qwen35-2b-random

The model is created directly in bf16 (the real checkpoints' dtype; half the memory of an fp32 init),
GDN parameters and norms get the spread `tests/checkpoints.py` gives them, and the tokenizer files of
the demo model are copied (the bundle's vocab_size comes from the config, not the tokenizer).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.checkpoints import REAL_CONFIGS, _spread_gdn_params  # noqa: E402

DEMO = ROOT / "lmbundle" / "data" / "demo" / "qwen35-tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=sorted(REAL_CONFIGS))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    cfg = Qwen3_5TextConfig(**REAL_CONFIGS[args.config])
    cfg.dtype = "bfloat16"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen3_5ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    _spread_gdn_params(model)
    model.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (DEMO / name).exists() and not (args.out / name).exists():
            shutil.copy2(DEMO / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {params / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
