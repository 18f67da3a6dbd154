"""The Python API: `lmbundle.load(path_or_hub_id)` gives a `Model` that generates, streams and chats.

    import lmbundle
    m = lmbundle.load("qwen35-2b-int8hu")             # a bundle folder, a checkpoint folder or a hub id
    m.generate("Once upon a time", max_tokens=64)      # -> str (greedy unless temperature > 0)
    for piece in m.stream("Once upon a time"):         # text pieces as they come; joined, what generate gives
        print(piece, end="")
    m.chat([{"role": "user", "content": "What is in the image?"}], images=["cat.jpg"])

A source that is not a bundle (a checkpoint folder, or a hub id such as "Qwen/Qwen3.5-2B") is converted once,
to `quant`, into the cache (`$LMBUNDLE_CACHE/bundles/`, else `~/.cache/lmbundle/bundles/`); later loads of
the same source reuse that bundle (delete its folder to convert again). Everything runs on the engine's
face (`engine/request.py`): a Request in, Outputs out; `Model.engine` is the engine itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .bundle.format import METADATA
from .engine.engine import Engine
from .engine.request import Output, Request, Stats
from .engine.sampling import Sampling
from .errors import LmbundleError

DEFAULT_CHUNK = 256  # prompts are fed in chunks of this many tokens, and the prefix cache snapshots at its multiples


def bundle_cache() -> Path:
    base = os.environ.get("LMBUNDLE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "lmbundle") / "bundles"


def bundle_of(source: str | os.PathLike, quant: str = "int8hu", backend: str | None = None) -> Path:
    """The bundle for `source`: the source itself when it is one, else its conversion in the cache (made now
    if missing). A path that is neither a bundle nor a checkpoint comes back as it is: opening it names
    what is wrong."""
    from .convert.checkpoint import hub_like

    path = Path(source).expanduser()
    checkpoint = path.is_dir() and (path / "config.json").exists() and not (path / METADATA).exists()
    hub = not path.exists() and hub_like(str(source))
    if not (checkpoint or hub):
        return path
    if hub:
        key = str(source).replace("/", "--")
    else:
        real = path.resolve()
        stamp = f"{real}:{(real / 'config.json').stat().st_mtime_ns}"
        key = f"{real.name}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
    target = bundle_cache() / re.sub(r"[^\w.-]+", "_", f"{key}-{quant}")
    if not (target / METADATA).exists():
        from .convert.convert import convert

        print(f"note: {source} is not a bundle: converting it ({quant}) into {target} (once; later loads reuse it)",
              file=sys.stderr, flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        convert(str(source), target, quant=quant, backend="all" if backend == "coreai" else "torch", log=None)
    return target


def load(source: str | os.PathLike, quant: str = "int8hu", **engine) -> Model:
    """A Model for a bundle folder, a checkpoint folder or a hub id (converted once to `quant`: see above).
    `engine`: the Engine's options (backend, device, max_batch, cache_bytes, ...); prompts are fed in chunks
    of 256 unless `prefill_chunk` says otherwise (0: single-token steps)."""
    engine.setdefault("prefill_chunk", DEFAULT_CHUNK)
    engine.setdefault("cache_block", engine["prefill_chunk"] or DEFAULT_CHUNK)
    return Model(Engine(bundle_of(source, quant, engine.get("backend")), **engine))


class TextStream:
    """The text pieces of one answer as they come; once it is read to the end, why it ended and its figures."""

    def __init__(self, outputs: Iterator[Output]):
        self._outputs = outputs
        self.finish_reason: str | None = None
        self.stats: Stats | None = None

    def __iter__(self) -> Iterator[str]:
        for output in self._outputs:
            if output.finish_reason is not None:
                self.finish_reason, self.stats = output.finish_reason, output.stats
            if output.text:
                yield output.text

    def close(self) -> None:
        self._outputs.close()


class Model:
    """A loaded bundle. Sampling options of every call: `max_tokens` (256), `temperature` (0: greedy),
    `top_p`, `top_k`, `min_p`, `seed`, `stop` (strings the text ends before); any other field of
    `engine.request.Request` (logprobs, penalties, logit_bias, grammar, ignore_eos...) goes through too."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def name(self) -> str:
        return self.engine.name

    def generate(self, prompt: str | Sequence[int], **options) -> str:
        """The answer to a plain prompt (text as it is, or token ids): no chat template."""
        return "".join(self.stream(prompt, **options))

    def stream(self, prompt: str | Sequence[int], **options) -> TextStream:
        """`generate`'s text, piece by piece as it is decoded."""
        return TextStream(self.engine.generate(_request(prompt=prompt, **options)))

    def chat(self, messages: Sequence[dict], images: Sequence = (), tools: Sequence[dict] | None = None,
             **options) -> str:
        """The assistant's reply to chat messages (the bundle's chat template). `images` (paths, bytes or PIL
        images) go before the text of the last user message; `tools` go to the template, and a call the model
        writes comes back as its text (Qwen3.5: `<tool_call>...</tool_call>`)."""
        return "".join(self.stream_chat(messages, images, tools, **options))

    def stream_chat(self, messages: Sequence[dict], images: Sequence = (), tools: Sequence[dict] | None = None,
                    **options) -> TextStream:
        """`chat`'s reply, piece by piece as it is decoded."""
        messages = list(messages)
        if images:
            last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
            if last is None:
                raise LmbundleError("images go with a user message; there is none")
            content = messages[last].get("content") or ""
            body = content if isinstance(content, list) else [{"type": "text", "text": content}]
            messages[last] = {**messages[last], "content": [*self.engine.attach_images(list(images)), *body]}
        return TextStream(self.engine.generate(_request(messages=messages, tools=tools, **options)))

    def user(self, text: str, images: Sequence = ()) -> dict:
        """A user message with its images prepared for the encoder (each distinct resize notice goes to stderr
        once); keep it in a conversation's history, and its images are not prepared again."""
        if not images:
            return {"role": "user", "content": text}
        return {"role": "user", "content": [*self.engine.attach_images(list(images)), {"type": "text", "text": text}]}

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _request(max_tokens: int | None = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             min_p: float = 0.0, seed: int | None = None, stop: str | Sequence[str] = (), **fields) -> Request:
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    return Request(max_tokens=max_tokens, sampling=sampling, stop=stop, **fields)
