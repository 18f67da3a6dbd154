"""The OpenAI protocol in process, against a scripted engine (no model): the engine Request each HTTP request
becomes, one answer whether streamed or not (content, reasoning, tool calls, logprobs, usage), the engine's
errors as HTTP statuses (also in the middle of a stream), and the guard. The real engine behind the same
routes: test_serve.py, test_serve_api.py."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from lmbundle.engine.grammar import GrammarError
from lmbundle.engine.prompt import Prompt
from lmbundle.engine.request import Output, Stats, TokenLogprobs
from lmbundle.errors import ContextTooLong, TemplateError
from lmbundle.serve.app import Options, create_app
from lmbundle.serve.guard import loopback_hosts

KEY = "k"
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MESSAGES = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


class ScriptedEngine:
    """What the server reads of an engine, answering every request with `pieces` (one token each) then
    `finish`; `fail` (an exception) is raised by `prompt` or, with `after` pieces, by the generation."""

    name, max_context, is_vlm, vision, backend_name, device, created = "scripted", 64, False, None, "none", "cpu", 0
    chat_template = "{{ messages }} {{ tools }}"
    vocab_size = tokenizer_size = 100
    scheduler = None

    def __init__(self):
        self.pieces, self.finish, self.thinking, self.fail, self.after = ["Hel", "lo"], "stop", False, None, None
        self.requests = []

    def sampling_defaults(self) -> dict:
        return {"temperature": 0.6, "top_p": 0.95, "top_k": 20}

    def token_bytes(self, token: int) -> list[int]:
        return list(f"t{token}".encode())

    def prompt(self, request) -> Prompt:
        self.requests.append(request)
        if self.fail is not None and self.after is None:
            raise self.fail
        return Prompt([1, 2, 3], "<|im_start|>assistant\n<think>\n" if self.thinking else "")

    def generate(self, request, prompt):
        for i, piece in enumerate(self.pieces):
            if self.after == i:
                raise self.fail
            logprobs = TokenLogprobs(-0.5, [(i, -0.5), (99, -2.0)]) if request.logprobs is not None else None
            yield Output(i, piece, logprobs)
        yield Output(None, "", finish_reason=self.finish,
                     stats=Stats(prompt_tokens=3, cached_tokens=1, generated_tokens=len(self.pieces)))

    def counts(self) -> dict:
        return {"batch_size": 0, "totals": {}, "cache": None, "scheduler": None}

    def close(self) -> None:
        pass


@pytest.fixture
def served():
    engine = ScriptedEngine()
    app = create_app(engine, Options(api_key=KEY, hosts=loopback_hosts(8000), timeout=30))
    with TestClient(app, base_url="http://127.0.0.1:8000", headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield engine, client


def post(client, path: str, body: dict):
    response = client.post(path, json=body)
    if not body.get("stream"):
        return response.status_code, response.json()
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return response.status_code, [e if e == "[DONE]" else json.loads(e) for e in events]


def joined(chunks: list, field: str) -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if isinstance(c, dict) and c.get("choices"))


def test_a_chat_becomes_the_engine_request_it_says(served):
    engine, client = served
    status, _ = post(client, "/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 7, "stop": ["x", "yz"], "top_p": 0.5, "seed": 3, "presence_penalty": 0.1,
        "logit_bias": {"5": -100}, "logprobs": True, "top_logprobs": 2, "enable_thinking": False,
        "response_format": {"type": "json_object"}})
    assert status == 200
    request = engine.requests[-1]
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert request.max_tokens == 7 and list(request.stop) == ["x", "yz"] and request.logprobs == 2
    sampling = request.sampling  # temperature and top_k from the checkpoint's defaults, top_p from the request
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.6, 0.5, 20, 3)
    assert request.presence_penalty == 0.1 and request.logit_bias == {5: -100.0}
    assert request.template_kwargs == {"enable_thinking": False} and request.grammar  # llguidance's JSON grammar
    post(client, "/v1/completions", {"prompt": [4, 5], "max_tokens": 3})
    assert list(engine.requests[-1].prompt) == [4, 5] and engine.requests[-1].messages is None


@pytest.mark.parametrize("thinking, pieces, expected", [
    (False, ["Hel", "lo"], {"content": "Hello", "reasoning_content": None}),
    (True, ["Hmm", ".</think>\n\n", "Hi!"], {"content": "Hi!", "reasoning_content": "Hmm."}),
    (False, ["Sure.", "\n" + CALL[:20], CALL[20:]], {"content": "Sure.", "reasoning_content": None}),
])
def test_streamed_and_whole_answers_are_the_same(served, thinking, pieces, expected):
    engine, client = served
    engine.thinking, engine.pieces = thinking, pieces
    body = {"messages": MESSAGES, "tools": [WEATHER], "stream_options": {"include_usage": True}}
    status, whole = post(client, "/v1/chat/completions", body)
    assert status == 200
    message, choice = whole["choices"][0]["message"], whole["choices"][0]
    assert {k: message[k] for k in expected} == expected
    calls = message.get("tool_calls") or []
    assert choice["finish_reason"] == ("tool_calls" if calls else "stop")
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": len(pieces), "total_tokens": 3 + len(pieces),
                              "prompt_tokens_details": {"cached_tokens": 1}}
    status, chunks = post(client, "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and chunks[-1] == "[DONE]" and chunks[-2]["usage"] == whole["usage"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert joined(chunks, "content") == message["content"]
    assert joined(chunks, "reasoning_content") == (message["reasoning_content"] or "")
    streamed = [tc for c in chunks[:-2] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2] if c["choices"][0]["finish_reason"]] == \
        [choice["finish_reason"]]


def test_logprobs_in_both_shapes(served):
    engine, client = served
    status, chat = post(client, "/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 1})
    entries = chat["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["t0", "t1"] and entries[0]["bytes"] == list(b"t0")
    assert entries[1]["top_logprobs"] == [{"token": "t1", "logprob": -0.5, "bytes": list(b"t1")},
                                          {"token": "t99", "logprob": -2.0, "bytes": list(b"t99")}]
    status, legacy = post(client, "/v1/completions", {"prompt": "x", "logprobs": 1})
    assert legacy["choices"][0]["text"] == "Hello"
    assert legacy["choices"][0]["logprobs"]["tokens"] == ["t0", "t1"]
    assert legacy["choices"][0]["logprobs"]["text_offset"] == [0, 2]
    status, chunks = post(client, "/v1/completions", {"prompt": "x", "logprobs": 1, "stream": True})
    assert [t for c in chunks[:-1] if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]] \
        == ["t0", "t1"]


@pytest.mark.parametrize("error, status, code, param", [
    (ContextTooLong("context too long: 70 prompt tokens"), 400, "context_length_exceeded", None),
    (TemplateError("the chat template refused these messages: no"), 400, None, "messages"),
    (GrammarError("unusable grammar: x"), 400, "invalid_response_format", "response_format"),
    (RuntimeError("boom"), 500, None, None),
])
def test_engine_errors_become_statuses(served, error, status, code, param):
    engine, client = served
    engine.fail = error
    got, body = post(client, "/v1/chat/completions", {"messages": MESSAGES})
    assert got == status and (body["error"]["code"], body["error"]["param"]) == (code, param)
    assert str(error) in body["error"]["message"]


def test_an_error_mid_stream_ends_it_with_a_last_chunk_and_the_error(served):
    engine, client = served
    engine.fail, engine.after = RuntimeError("device lost"), 1
    status, chunks = post(client, "/v1/chat/completions", {"messages": MESSAGES, "stream": True})
    assert status == 200 and joined(chunks, "content") == "Hel"
    assert chunks[-2]["choices"][0]["finish_reason"] == "error"
    assert chunks[-1]["error"]["type"] == "server_error" and "device lost" in chunks[-1]["error"]["message"]


def test_client_mistakes_are_refused_before_the_engine(served):
    engine, client = served
    assert post(client, "/v1/completions", {"prompt": [4, 100]})[1]["error"]["param"] == "prompt"
    assert post(client, "/v1/chat/completions", {"messages": MESSAGES, "tool_choice": "required"})[0] == 400
    assert post(client, "/v1/chat/completions", {"messages": MESSAGES, "model": "other"})[0] == 404
    assert engine.requests == []


def test_the_guard(served):
    _, client = served
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Host": "evil.example:8000"}).status_code == 403
    assert client.post("/v1/completions", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.get("/", headers={"Authorization": ""}).status_code == 200
    assert client.get("/v1/models").json()["data"][0]["id"] == "scripted"


def client_of(engine, **options) -> TestClient:
    app = create_app(engine, Options(api_key=KEY, hosts=loopback_hosts(8000), timeout=30, **options))
    return TestClient(app, base_url="http://127.0.0.1:8000", headers={"Authorization": f"Bearer {KEY}"})


@pytest.mark.parametrize("field, value", [("stream", "yes"), ("max_tokens", "10"), ("temperature", True),
                                          ("top_p", "0.5"), ("seed", 1.5), ("logprobs", 1)])
def test_fields_of_the_wrong_type_are_refused_not_coerced(served, field, value):
    engine, client = served
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, field: value})
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.json()
    assert engine.requests == []
    assert post(client, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 1, "max_tokens": 5})[0] == 200


def test_an_integer_of_5000_digits_is_400(served):
    _, client = served
    raw = b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}"
    response = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    assert "5000 digits" in response.json()["error"]["message"]


def test_models_by_id_and_a_served_name():
    engine = ScriptedEngine()
    with client_of(engine) as client:
        assert client.get("/v1/models/scripted").json()["id"] == "scripted"
        assert client.get("/v1/models/other").status_code == 404
    with client_of(engine, model_name="org/alias") as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["org/alias"]
        assert client.get("/v1/models/org/alias").json()["id"] == "org/alias"
        status, body = post(client, "/v1/chat/completions", {"messages": MESSAGES, "model": "org/alias"})
        assert status == 200 and body["model"] == "org/alias"
        assert post(client, "/v1/chat/completions", {"messages": MESSAGES, "model": "scripted"})[0] == 404
        assert client.get("/health").json()["model"] == "org/alias"


def test_health_is_open_without_the_key_and_says_only_ok():
    with client_of(ScriptedEngine()) as client:
        assert client.get("/health", headers={"Authorization": ""}).json() == {"status": "ok"}
        assert client.get("/health", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ok"}
        assert client.get("/health").json()["queue_size"] == 16  # with the key: the whole report
        for path in ("/metrics", "/v1/models", "/api/info"):  # everything else keeps the key
            assert client.get(path, headers={"Authorization": ""}).status_code == 401, path


def test_cors_only_for_the_origins_allowed():
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type", "Authorization": ""}
    with client_of(ScriptedEngine()) as client:  # off by default
        assert "access-control-allow-origin" not in client.options("/v1/chat/completions", headers=preflight).headers
    with client_of(ScriptedEngine(), cors_origins=["https://app.example"]) as client:
        answer = client.options("/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        got = client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert got.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert client.get("/v1/models", headers={"Origin": "https://evil.example"}).headers.get(
            "access-control-allow-origin") is None


def test_the_page_forbids_framing_and_foreign_scripts(served):
    _, client = served
    page = client.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    for response in (page, client.get("/static/app.js"), client.get("/v1/models")):
        assert response.headers["x-content-type-options"] == "nosniff"


def test_one_log_line_per_request_when_asked(caplog):
    caplog.set_level("INFO", logger="lmbundle.serve")
    with client_of(ScriptedEngine()) as client:
        post(client, "/v1/chat/completions", {"messages": MESSAGES})
    assert not [r for r in caplog.records if r.name == "lmbundle.serve"]  # quiet by default
    with client_of(ScriptedEngine(), log_requests=True) as client:
        post(client, "/v1/chat/completions", {"messages": MESSAGES})
        post(client, "/v1/chat/completions", {"messages": MESSAGES, "stream": True})
        client.get("/v1/models", headers={"Authorization": ""})
        post(client, "/v1/completions", {"prompt": "x", "max_tokens": "2"})
    lines = [r.getMessage() for r in caplog.records if r.name == "lmbundle.serve"]
    assert len(lines) == 4, lines
    assert re.fullmatch(r"POST /v1/chat/completions 200 3\+2 tokens \d+\.\d{3} s", lines[0]), lines[0]
    assert re.fullmatch(r"POST /v1/chat/completions 200 3\+2 tokens \d+\.\d{3} s", lines[1]), lines[1]
    assert re.fullmatch(r"GET /v1/models 401 \d+\.\d{3} s", lines[2])
    assert lines[3].startswith("POST /v1/completions 400")


def test_a_strict_tool_the_grammar_cannot_enforce_is_400_and_a_cut_call_stays_out_of_the_content(served):
    engine, client = served
    strict = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}}
    status, body = post(client, "/v1/chat/completions", {"messages": MESSAGES, "tools": [strict],
                                                         "tool_choice": "required"})
    assert status == 400 and body["error"]["param"] == "tools" and "uniqueItems" in body["error"]["message"]
    strict["function"]["strict"] = False  # left out of the constraint instead
    loose = {"messages": MESSAGES, "tools": [strict], "tool_choice": "required"}
    assert post(client, "/v1/chat/completions", loose)[0] == 200
    engine.pieces, engine.finish = ["Sure.", "\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOs"], "length"
    status, whole = post(client, "/v1/chat/completions", {"messages": MESSAGES, "tools": [WEATHER]})
    message = whole["choices"][0]["message"]
    assert message["content"] == "Sure." and "tool_calls" not in message
    assert whole["choices"][0]["finish_reason"] == "length"
    status, chunks = post(client, "/v1/chat/completions", {"messages": MESSAGES, "tools": [WEATHER], "stream": True})
    assert joined(chunks, "content") == "Sure."
