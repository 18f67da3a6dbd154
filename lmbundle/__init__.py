"""lmbundle: Qwen3.5 / Qwen3-VL checkpoints -> small, exact, fast on-device bundles, and a Python API to run
them: `lmbundle.load(path_or_hub_id)` -> `Model` (`generate`, `stream`, `chat`; lmbundle/api.py)."""

__version__ = "0.1.0"
__all__ = ["Model", "load"]


def __getattr__(name: str):
    if name in __all__:  # torch and the engine load with the first use, not with `import lmbundle`
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmbundle' has no attribute {name!r}")
