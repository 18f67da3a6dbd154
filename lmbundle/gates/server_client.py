"""The server side of `lmbundle gate --server`: greedy rollouts with log-probabilities from any
OpenAI-compatible server, through the official `openai` client.

What a server allows is found by asking: the most alternatives per token (`top_logprobs`, 20 down to 1,
stepping down on a 400 that names logprobs), whether `/v1/completions` takes a list of token ids as its
prompt (asked once). Problems the user must fix (no connection, a refused key, a model the server does not
have, no logprobs at all) are one-line `LmbundleError`s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import LmbundleError
from .server_tokens import Entry, entries

TOP_LOGPROBS = (20, 10, 5, 1)
# vLLM's extensions: logprob entries name tokens as "token_id:N"; the choice lists its `token_ids` (ours
# takes the first; servers that know neither ignore them)
TOKEN_ID_FIELDS = {"return_tokens_as_token_ids": True, "return_token_ids": True}
TIMEOUT = 300.0
PUSH = 100  # the largest logit_bias OpenAI's API takes


@dataclass
class Completion:
    """One greedy rollout as the server returned it."""

    path: list[Entry]
    text: str | None
    finish: str | None
    prompt_tokens: int | None
    generated: int | None  # usage.completion_tokens: more than len(path) where the server left entries out


@dataclass
class Server:
    url: str
    model: str | None = None
    api_key: str | None = None
    top: dict[str, int] = field(default_factory=dict)  # endpoint -> top_logprobs it accepts
    extra: dict = field(default_factory=lambda: dict(TOKEN_ID_FIELDS))

    def __post_init__(self) -> None:
        try:
            import openai
        except ModuleNotFoundError:
            raise LmbundleError("gate --server needs the 'openai' package (pip install openai)") from None
        self._openai = openai
        self.api_error = openai.APIError  # what a request can raise that is the server's doing
        self.status_error = openai.APIStatusError  # of those, an answer with an HTTP error status
        base = self.url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise LmbundleError(f"--server {self.url!r}: give an http:// or https:// URL")
        self.base = base if base.endswith("/v1") else base + "/v1"
        key = self.api_key or os.environ.get("LMBUNDLE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.client = openai.OpenAI(base_url=self.base, api_key=key or "none", max_retries=0, timeout=TIMEOUT)
        self.keyed = bool(key)
        self.card: dict = {}
        self.listed = False  # whether an answer has listed logprobs
        self.token_prompts: str | None = None  # "" where /v1/completions takes token ids, else why not; None: unasked

    # -- what the server is --------------------------------------------------------------------------
    def connect(self) -> str:
        """The model to gate: --model, which the server must list, else the one model it lists."""
        try:
            listed = [m.model_dump() for m in self._call(lambda: self.client.models.list().data)]
        except self.api_error as exc:
            raise LmbundleError(self.describe_error(exc)) from None
        names = [m.get("id") for m in listed]
        if self.model is None:
            if len(names) != 1:
                raise LmbundleError(f"{self.base} serves {len(names)} models ({', '.join(map(str, names[:8]))}): "
                                    "pass --model")
            self.model = names[0]
        elif self.model not in names:
            raise LmbundleError(f"{self.base} has no model {self.model!r} (it serves: "
                                f"{', '.join(map(str, names[:8])) or 'none'})")
        self.card = listed[names.index(self.model)]
        return self.model

    # -- rollouts -------------------------------------------------------------------------------------
    def chat(self, text: str, max_tokens: int) -> Completion:
        def send(k: int, extra: dict):
            return self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                temperature=0, seed=0, logprobs=True, top_logprobs=k, extra_body=extra)
        choice, usage = self._greedy("chat", send)
        return Completion(_path(choice), (choice.get("message") or {}).get("content"), choice.get("finish_reason"),
                          usage.get("prompt_tokens"), usage.get("completion_tokens"))

    def complete(self, ids: list[int], max_tokens: int, required: bool = True) -> Completion:
        def send(k: int, extra: dict):
            return self.client.completions.create(model=self.model, prompt=ids, max_tokens=max_tokens,
                                                  temperature=0, seed=0, logprobs=k, extra_body=extra)
        return self._completion(send, required)

    def pushed(self, ids: list[int], token: int) -> Entry | None:
        """The entry of one token generated after the token ids `ids` with `token` pushed to be chosen
        (logit_bias +100): a server that reports log-probs before its bias lists the model's own distribution at
        that position whatever token it would have chosen. None where it lists no entry."""
        def send(k: int, extra: dict):
            return self.client.completions.create(model=self.model, prompt=ids, max_tokens=1, temperature=0, seed=0,
                                                  logprobs=k, logit_bias={str(token): PUSH}, extra_body=extra)
        path = self._completion(send, required=False).path
        return path[0] if path else None

    def refuses_token_ids(self, ids: list[int]) -> str:
        """"" when /v1/completions takes `ids` as its prompt, else the server's reason (asked once)."""
        if self.token_prompts is None:
            try:
                self.complete(ids, 1, required=False)
                self.token_prompts = ""
            except self._openai.APIStatusError as exc:
                if exc.status_code not in (400, 404, 405, 422, 501):
                    raise
                self.token_prompts = self.refusal(exc)
        return self.token_prompts

    def _completion(self, send, required: bool) -> Completion:
        choice, usage = self._greedy("completions", send, required)
        return Completion(_path(choice), choice.get("text"), choice.get("finish_reason"), usage.get("prompt_tokens"),
                          usage.get("completion_tokens"))

    def _greedy(self, endpoint: str, send, required: bool = True) -> tuple[dict, dict]:
        """One request at the most top_logprobs the endpoint accepts (found on the first request). An answer
        without logprobs is an error where `required` and no answer before listed any (a server that holds
        back the entries of tokens ending inside a UTF-8 character may list none for a short rollout)."""
        options = [self.top[endpoint]] if endpoint in self.top else list(TOP_LOGPROBS)
        for k in options:
            try:
                response = self._call(lambda: send(k, self.extra), endpoint=endpoint).model_dump()
            except self._openai.APIStatusError as exc:
                text = _message(exc).lower()
                if exc.status_code in (400, 422) and self.extra and any(name in text for name in self.extra):
                    self.extra = {}
                    return self._greedy(endpoint, send, required)
                if exc.status_code in (400, 422) and "logprob" in text and k != options[-1]:
                    continue
                raise
            self.top[endpoint] = k
            choice = (response.get("choices") or [{}])[0]
            self.listed |= bool(choice.get("logprobs"))
            if required and not self.listed and not choice.get("logprobs"):
                raise LmbundleError(f"{self.base}: {endpoint} answered without logprobs; the gate compares them")
            return choice, response.get("usage") or {}
        raise AssertionError("unreachable")

    def _call(self, request, endpoint: str = "models"):
        """Run one request; what the user must fix becomes a one-line error."""
        openai = self._openai
        try:
            return request()
        except openai.APITimeoutError:
            raise LmbundleError(f"{self.base}: no answer from {endpoint} in {TIMEOUT:g} s") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise LmbundleError(f"cannot reach {self.base} ({type(cause).__name__}: {str(cause)[:200]})") from None
        except openai.AuthenticationError as exc:
            hint = "refused the API key" if self.keyed else "needs an API key (--api-key or LMBUNDLE_API_KEY)"
            raise LmbundleError(f"{self.base} {hint} (401: {_message(exc)})") from None
        except openai.PermissionDeniedError as exc:
            raise LmbundleError(f"{self.base} refused the request (403: {_message(exc)})") from None
        except openai.NotFoundError as exc:
            if endpoint == "models":
                raise LmbundleError(f"{self.base}/models not found (404): is this an OpenAI-compatible server?") \
                    from None
            if "model" in _message(exc).lower():
                raise LmbundleError(f"{self.base} has no model {self.model!r} (404: {_message(exc)})") from None
            raise

    @staticmethod
    def refusal(exc) -> str:
        """An HTTP error answer in a few words: its status and the server's message."""
        return f"{exc.status_code}: {_message(exc)}"

    def describe_error(self, exc: Exception) -> str:
        """A request the gate needed failed in a way no flag fixes: what the server said, in one line."""
        if isinstance(exc, self._openai.APIStatusError):
            return f"{self.base} answered {exc.status_code}: {_message(exc)}"
        return f"{self.base}: {type(exc).__name__}: {str(exc)[:200]}"


def _path(choice: dict) -> list[Entry]:
    """The choice's logprob entries, with the ids of its `token_ids` where the server listed them."""
    path = entries(choice.get("logprobs"))
    ids = choice.get("token_ids")
    if isinstance(ids, list) and len(ids) == len(path) and all(isinstance(i, int) for i in ids):
        for entry, token in zip(path, ids):
            entry.id = token
    return path


def _message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return str(message)[:300]
        if body.get("detail"):
            return str(body["detail"])[:300]
    return str(getattr(exc, "message", exc))[:300]
