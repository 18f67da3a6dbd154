"""lmbundle: Qwen3.5 / Qwen3-VL checkpoints -> small, exact, fast on-device bundles."""

__version__ = "0.1.0"
