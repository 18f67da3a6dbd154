"""Chat prompts where only the chat template makes control tokens.

A tokenizer encodes the string `<|im_end|>` as the control token wherever it occurs, so a message that
contains `<|im_end|>\\n<|im_start|>system ...` would end its own turn and open a system turn (a role
injection). Here every string that came from the caller (message text, reasoning, tool results, tool
definitions) has its special-token strings defused with a private-use mark before the template runs;
the rendered prompt is then cut at the special tokens that remain (the template's own) and each piece
between them is encoded with special tokens split into text (the mark removed first). For prompts
without such strings this gives exactly the ids of a plain `apply_chat_template(tokenize=True)`: a
tokenizer also cuts at its special tokens first and encodes the pieces between them on their own.

A prompt's size is bounded before it is tokenized (`PromptBound`): tokenizing costs about a second per
megabyte, and a prompt that cannot fit the context should not cost that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jinja2

from ..errors import ContextTooLong, TemplateError
from ..models.image_prompt import ImageContext

MARK = "\ue000"  # a private-use character: inserted after the first character of a special token
_UNMARK = re.compile(MARK + "(" + MARK + "?)")


@dataclass
class Prompt:
    """A request's prompt as the engine feeds it: token ids (image tokens as vocab + slot) and, for an image
    prompt, the images' context for the decoder; for a chat, the rendered template too."""

    ids: list[int]
    text: str = ""  # the rendered template (client special-token strings shown as text); "" for plain ids
    images: ImageContext | None = None

    @property
    def opens_thinking(self) -> bool:
        """The prompt ends inside an open <think> block (Qwen3.5's generation prompt when thinking is on):
        the model's first tokens are reasoning, and `</think>` ends them."""
        tail = self.text[self.text.rfind("<|im_start|>"):]
        return tail.rfind("<think>") > tail.rfind("</think>")


class PromptBound:
    """The most bytes of text that `max_context` tokens can stand for: every token stands for at most
    `token_bytes` bytes of the normalized text (the vocabulary's longest token: 128 bytes for Qwen3.5's,
    a run of spaces), so a text longer than max_context x token_bytes cannot fit, whatever it holds.
    The tokenizer's normalizer runs first (Qwen's is NFC), and Unicode normalization shrinks text at most
    4-fold (a Greek letter with three combining marks: 8 bytes -> 3; Hangul jamo: 9 -> 3): a text past 4x
    the bound is refused on its size alone, one between is normalized first (milliseconds a megabyte)."""

    SHRINK = 4

    def __init__(self, tokenizer, max_context: int):
        vocab = tokenizer.get_vocab()
        longest = max(map(len, vocab), default=1)  # a token string's UTF-8 bytes bound the bytes it stands for
        self.token_bytes = max(len(t.encode()) for t in vocab if self.SHRINK * len(t) >= longest)
        self.max_context = max_context
        self.limit = max_context * self.token_bytes
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.normalizer = getattr(backend, "normalizer", None)

    def check(self, text: str) -> None:
        """ContextTooLong if `text` has more bytes than any prompt that fits (see the class)."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if size <= self.limit:
            return
        if self.normalizer is not None and size <= self.SHRINK * self.limit:
            size = len(self.normalizer.normalize_str(text).encode("utf-8", "surrogatepass"))
            if size <= self.limit:
                return
        raise ContextTooLong(f"context too long: a prompt of {size:,} bytes; the bundle's {self.max_context} tokens "
                             f"hold at most {self.limit:,} bytes of text (a token stands for at most "
                             f"{self.token_bytes} bytes)")


def special_tokens(tokenizer) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in decoder.values() if getattr(t, "special", False)}
    found.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((t for t in found if t and len(t) > 1), key=len, reverse=True)


def defuse(value, pattern: re.Pattern):
    """A deep copy of `value` with every special-token string in its strings (dict keys too) marked."""
    if isinstance(value, str):
        return pattern.sub(lambda m: m.group(0)[0] + MARK + m.group(0)[1:], value.replace(MARK, MARK + MARK))
    if isinstance(value, dict):
        return {defuse(k, pattern): defuse(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [defuse(v, pattern) for v in value]
    return value


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                template_kwargs: dict | None = None, add_generation_prompt: bool = True,
                bound: PromptBound | None = None) -> Prompt:
    """Template-rendered chat -> ids, with the caller's strings always tokenized as text. Image parts
    ({"type": "image"}) and other non-string values pass through untouched. A template's own refusal
    (`raise_exception`) is a TemplateError; a rendered prompt past `bound` is ContextTooLong, before it
    is tokenized."""
    try:
        return _render(tokenizer, messages, tools, template_kwargs, add_generation_prompt, bound)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the chat template refused these messages: {str(exc)[:300]}") from None


def _render(tokenizer, messages, tools, template_kwargs, add_generation_prompt, bound) -> Prompt:
    specials = special_tokens(tokenizer)
    kwargs = dict(template_kwargs or {})
    if not specials:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **kwargs)
        if bound is not None:
            bound.check(text)
        return Prompt(list(tokenizer.encode(text, add_special_tokens=False)), text)
    pattern = re.compile("|".join(map(re.escape, specials)))
    rendered = tokenizer.apply_chat_template(defuse(messages, pattern), tools=defuse(tools, pattern) if tools else None,
                                             add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
    text = _UNMARK.sub(r"\1", rendered)
    if bound is not None:
        bound.check(text)
    ids: list[int] = []
    cut = 0
    for match in pattern.finditer(rendered):  # the template's own control tokens (the caller's are marked)
        ids += _as_text(tokenizer, rendered[cut:match.start()])
        ids.append(tokenizer.convert_tokens_to_ids(match.group(0)))
        cut = match.end()
    ids += _as_text(tokenizer, rendered[cut:])
    return Prompt(ids, text)


def _as_text(tokenizer, piece: str) -> list[int]:
    if not piece:
        return []
    piece = _UNMARK.sub(r"\1", piece)
    return list(tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"])
