"""`lmbundle gate --server`: our own server, run in this process, gated against the fp32 oracle.

The demo and a fresh-init checkpoint PASS; a checkpoint of the same shape with other weights, a wrong RoPE, a
wrong chat template and broken int8 scales FAIL; connection, key and model problems are one-line errors (exit 2).
Our server made to hold back logprob entries the way llama-server does still PASSes (the gate asks for each left-out
position again), and one that also refuses what that takes is a precise "cannot check" FAIL.
The parts that need no server (naming tokens, a rollout with entries left out, perturbed log-probs) are checked
on rollouts built from the oracle itself, where the right answer is known.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx2
import openai
import pytest
import torch
import uvicorn

from lmbundle.cli import main
from lmbundle.convert.convert import convert
from lmbundle.engine.engine import Engine
from lmbundle.gates.oracle import Oracle
from lmbundle.gates.server_client import Completion, Server
from lmbundle.gates.server_gate import PROMPTS, chat_ids, run_server_gate, stop_ids, teacher_forced
from lmbundle.gates.server_tokens import Entry, TokenTable, entries
from lmbundle.models.layers import rope_inv_freq
from lmbundle.models.linear import dequantize, quantize_absmax
from lmbundle.serve.app import Options, create_app
from tests import checkpoints
from tests.conftest import DEMO_QWEN35, free_port

KEY = "gate-key"
QUICK = dict(prompts=PROMPTS[:4], random=1, steps=16)  # enough positions to see a broken server, in seconds


@contextlib.contextmanager
def serving(engine: Engine, api_key: str | None = None, wrap=lambda app: app):
    """`lmbundle serve`'s app (as `wrap` makes it) on a loopback port, in a thread of this process."""
    port = free_port()
    config = uvicorn.Config(wrap(create_app(engine, Options(api_key=api_key))), host="127.0.0.1", port=port,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def gate(url: str, oracle: Oracle, **kwargs):
    server = Server(url, api_key=KEY)
    server.connect()
    return run_server_gate(server, oracle, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def threads(one_thread):
    yield


@pytest.fixture(scope="module")
def demo_oracle():
    return Oracle(str(DEMO_QWEN35))


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    """The demo's int8hu bundle, without a prefix cache: the tests break its weights in place and restore them,
    and a cached prompt state would carry a broken run into the next one."""
    bundle = convert(str(DEMO_QWEN35), tmp_path_factory.mktemp("gate-server") / "demo", quant="int8hu",
                     backend="torch", log=None)
    return Engine(bundle, backend="torch", device="cpu", cache_bytes=0)


@pytest.fixture(scope="module")
def demo_server(demo_engine):
    with serving(demo_engine, KEY) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_oracle(tiny_qwen35):
    return Oracle(str(tiny_qwen35))


@pytest.fixture(scope="module")
def fresh_engine(tiny_qwen35, tmp_path_factory):
    bundle = convert(str(tiny_qwen35), tmp_path_factory.mktemp("gate-server") / "fresh", quant="fp16",
                     backend="torch", log=None)
    return Engine(bundle, backend="torch", device="cpu")


# -- PASS --------------------------------------------------------------------------------------------------
def test_demo_server_passes_through_the_cli(demo_server, capsys):
    main(["gate", "--server", demo_server, "--oracle", str(DEMO_QWEN35), "--api-key", KEY, "--json"])
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["passed"] and result["verdict"] == "PASS"
    assert result["precision"] == "int8" and "name" in result["precision_source"]  # qwen35-tiny_int8hu
    assert result["template_matched"] == result["template_checked"] == 16
    assert result["random_prompts"] == 4 and result["token_prompts"] == ""
    assert result["top_logprobs"] == {"chat": 20, "completions": 20}
    assert result["unchecked"] == 0 and result["positions"] >= 500 and result["entries"] >= 20 * 500
    # int8 weights against the fp32 oracle: forks only at near-ties, log-probs within ~0.05 std (bound 0.5)
    assert result["forks_clear"] == 0 and result["agreed"] >= 0.95 * result["positions"]
    assert result["worst"] < 0.1 and result["mean"] < 0.03
    assert err.count("\n") == 21 and "random 4/4" in err  # one progress line per rollout


@pytest.mark.parametrize("argv, message", [
    (["--api-key", "wrong"], "refused the API key (401"),
    ([], "needs an API key"),
    (["--api-key", KEY, "--model", "nope"], "has no model 'nope' (it serves: qwen35-tiny_int8hu)"),
])
def test_server_problems_are_one_line_errors(demo_server, monkeypatch, capsys, argv, message):
    monkeypatch.delenv("LMBUNDLE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["gate", "--server", demo_server, "--oracle", str(DEMO_QWEN35), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_no_server_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["gate", "--server", f"http://127.0.0.1:{free_port()}", "--oracle", str(DEMO_QWEN35)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: cannot reach http://127.0.0.1:") and err.count("\n") == 1


def test_fresh_checkpoint_passes_and_another_of_its_shape_fails(fresh_engine, tiny_oracle, tmp_path):
    with serving(fresh_engine, KEY) as url:
        report = gate(url, tiny_oracle, **QUICK)
    assert report.passed, report.lines() + report.failures
    assert report.precision == "fp16" and report.agreed == report.positions and report.worst < 0.01
    assert report.left_out == report.unchecked == 0

    other = checkpoints.make_qwen35_with_tokenizer(tmp_path / "other", seed=1, **checkpoints.TINY_CONFIGS["base"])
    bundle = convert(str(other), tmp_path / "other-fp16", quant="fp16", backend="torch", log=None)
    with serving(Engine(bundle, backend="torch", device="cpu"), KEY) as url:
        report = gate(url, tiny_oracle, **QUICK)
    assert not report.passed and report.template_matched == report.template_checked  # same tokenizer
    assert report.agreed < 0.2 * report.positions and report.mean > 1  # measured: 1/513, 4.0 std
    assert any("not the oracle's top-1 where its margin is clear" in f for f in report.failures)


# -- FAIL: broken servers of the demo -----------------------------------------------------------------------
@contextlib.contextmanager
def changed(tensor: torch.Tensor, value: torch.Tensor):
    saved = tensor.clone()
    tensor.copy_(value)
    try:
        yield
    finally:
        tensor.copy_(saved)


def test_wrong_rope_theta_fails(demo_engine, demo_server, demo_oracle):
    """A server that ignores the checkpoint's rope_theta (1e7) and uses the common default 1e4."""
    cfg = demo_engine.bundle.info["config"]
    model = demo_engine.backend.model
    with changed(model.inv_freq, rope_inv_freq(cfg["head_dim"], 1e4, cfg["partial_rotary_factor"])):
        report = gate(demo_server, demo_oracle, **QUICK)
    assert not report.passed and report.mean > 2 * report.mean_bound, report.lines()  # measured 0.43 std
    assert any("log-probs differ" in f for f in report.failures)


def test_wrong_chat_template_fails(demo_engine, demo_server, demo_oracle):
    tokenizer = demo_engine.tokenizer
    template = tokenizer.chat_template
    tokenizer.chat_template = template.replace("{{ message['role'] }}\n", "{{ message['role'] }}:\n")
    try:
        report = gate(demo_server, demo_oracle, **QUICK)
    finally:
        tokenizer.chat_template = template
    assert not report.passed and report.template_matched == 0, report.lines()
    assert report.failures[0].startswith("chat template: 4 of 4 prompts differ in length from the oracle's")


def test_broken_int8_scales_fail(demo_engine, demo_server, demo_oracle):
    """int8 weights read with their neighbour block's scales (an off-by-one in a kernel's scale index), in every
    MLP down projection: the server still declares int8 (its model name), and its int8 bound does not cover it."""
    params = demo_oracle.text_parameters()
    with contextlib.ExitStack() as stack:
        for i, layer in enumerate(demo_engine.backend.model.model.layers):
            qweight, scales = quantize_absmax(params[f"model.layers.{i}.mlp.down_proj.weight"].detach())
            stack.enter_context(changed(layer.mlp.down_proj.weight, dequantize(qweight, scales.roll(1, dims=1))))
        report = gate(demo_server, demo_oracle, **QUICK)
    assert not report.passed and report.precision == "int8", report.lines()
    assert report.mean > report.mean_bound and report.worst > report.bound  # measured 0.27 and 1.04 std


# -- a server that holds back logprob entries as llama-server does -----------------------------------------------
def ends_inside_a_character(text: bytes) -> bool:
    """llama-server's test (validate_utf8): a lead byte among the last four whose character is cut short."""
    needs = [(0xE0, 0xC0, 2), (0xF0, 0xE0, 3), (0xF8, 0xF0, 4)]
    return any((text[-i] & mask) == lead and i < size for i in range(1, min(4, len(text)) + 1)
               for mask, lead, size in needs)


class HeldBack:
    """Our app answering its completions as llama-server does: logprob entries in the chat shape with `id` and
    `bytes`, none for a token after which the text ends inside a UTF-8 character (its bytes go to the next entry),
    no `token_ids`. `token_ids` False: refuses a prompt of token ids; `bias` "ignored": drops logit_bias; "applied":
    reports log-probs after it (the pushed token's 0, the others 100 lower)."""

    def __init__(self, app, table: TokenTable, token_ids: bool = True, bias: str = "before"):
        self.app, self.table, self.token_ids, self.bias = app, table, token_ids, bias

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("completions"):
            return await self.app(scope, receive, send)
        body, message = b"", {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            body += message.get("body", b"")
        request = json.loads(body)
        pushed = request.pop("logit_bias", None) if self.bias == "ignored" else request.get("logit_bias")
        if not self.token_ids and isinstance(request.get("prompt"), list):
            return await self.reply(send, 400, [], json.dumps({"error": {"message": "prompt must be a string"}}))
        sent = []

        async def replay():
            if sent:
                return await receive()
            sent.append(True)
            return {"type": "http.request", "body": json.dumps(request).encode(), "more_body": False}

        start, chunks = {}, []

        async def keep(message):
            (start.update if message["type"] == "http.response.start" else chunks.append)(message)

        await self.app(scope, replay, keep)
        answer = b"".join(m.get("body", b"") for m in chunks)
        if start["status"] == 200:
            biased = {int(k) for k in pushed or {}} if self.bias == "applied" else set()
            answer = json.dumps(self.hold_back(json.loads(answer), biased))
        await self.reply(send, start["status"], start["headers"], answer)

    @staticmethod
    async def reply(send, status: int, headers: list, body: str | bytes):
        body = body.encode() if isinstance(body, str) else body
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def hold_back(self, response: dict, biased: set[int]) -> dict:
        choice = response["choices"][0]
        choice.pop("token_ids", None)

        def entry(name: str, value: float, held: bytes = b"") -> dict:
            token = int(name.removeprefix("token_id:"))
            return {"id": token, "token": "", "bytes": list(held + self.table.bytes[token]),
                    "logprob": 0.0 if token in biased else value - 100 * bool(biased)}

        listed, text, held = [], b"", b""
        for e in entries(choice.get("logprobs")):
            data = self.table.bytes[int(e.token.removeprefix("token_id:"))]
            text += data
            if ends_inside_a_character(text):
                held += data
                continue
            top = [entry(t.token, t.logprob) for t in e.top]
            listed.append(entry(e.token, e.logprob, held) | {"top_logprobs": top})
            held = b""
        choice["logprobs"] = {"content": listed} if listed else None
        return response


@pytest.mark.parametrize("token_ids, bias, refusal", [
    (True, "before", ""),
    (False, "before", "takes no token-id prompts (400: prompt must be a string)"),
    (True, "ignored", "does not list the token logit_bias pushes"),
    (True, "applied", "reports log-probs after logit_bias"),
])
def test_left_out_entries_are_asked_for_again(fresh_engine, tiny_oracle, token_ids, bias, refusal):
    """A fresh-init model writes byte tokens all the time, so most rollouts have holes. Filled, every generated
    position is checked and the figures are an exact server's; a server that cannot fill them is a FAIL that says
    the gate cannot check it, and why, not that the model is wrong."""
    table = TokenTable(tiny_oracle.tokenizer)
    with serving(fresh_engine, KEY, lambda app: HeldBack(app, table, token_ids, bias)) as url:
        report = gate(url, tiny_oracle, prompts=PROMPTS[:4], random=1 if token_ids else 0, steps=16)
    assert report.left_out > 0.1 * report.generated and report.fill_refused.startswith(refusal), report.lines()  # ~0.2
    if not refusal:
        assert report.passed and report.filled == report.left_out and report.unchecked == 0
        assert report.positions >= report.generated and report.agreed == report.positions and report.worst < 0.01
    else:
        assert report.filled == 0 and 2 * report.unchecked > report.generated
        checked = report.generated - report.unchecked
        assert report.failures == [(f"cannot check: the server lists no logprobs for {report.left_out} of "
                                    f"{report.generated} generated tokens and {report.fill_refused}; {checked} of "
                                    f"{report.generated} generated tokens could be checked")]


# -- without a server: rollouts made from the oracle, where the right answer is known ------------------------
def oracle_rollout(oracle: Oracle, ids: list[int], steps: int, top: int = 5) -> Completion:
    """The rollout an exact server would return: the oracle's greedy tokens, its log-probs, named by bytes."""
    table = TokenTable(oracle.tokenizer)
    tokens, logits = oracle.greedy_with_logits(ids, steps)
    path = []
    for token, row in zip(tokens, logits.double().log_softmax(-1)):
        values, alternatives = row.topk(top)
        path.append(Entry("", float(row[token]), table.bytes[token],
                          top=[Entry("", float(v), table.bytes[a]) for v, a in zip(values, alternatives.tolist())]))
    return Completion(path, None, "length", len(ids), len(tokens))


def test_exact_rollout_measures_zero_and_perturbations_are_measured(tiny_oracle):
    oracle = tiny_oracle
    table, ids = TokenTable(oracle.tokenizer), chat_ids(oracle.tokenizer, PROMPTS[0])
    rollout = oracle_rollout(oracle, ids, 12)
    positions, unchecked = teacher_forced(oracle, table, ids, rollout, stop_ids(oracle), "r")
    assert len(positions) == 12 and unchecked == 0
    assert max(p.error for p in positions) < 1e-4 and all(p.gap == 0 for p in positions)  # fp32 vs fp32
    std = float(oracle.forward(ids + [e.id for e in rollout.path[:4]]).logits[-1].std())
    rollout.path[4].top[2].logprob += 0.3 * std  # one alternative at one position off by 0.3 std
    positions, _ = teacher_forced(oracle, table, ids, rollout, stop_ids(oracle), "r")
    assert positions[4].error == pytest.approx(0.3, rel=1e-3)
    assert max(p.error for i, p in enumerate(positions) if i != 4) < 1e-4


def test_entries_left_out_cut_the_rollout_where_the_bytes_stop_matching(tiny_oracle):
    """llama-server lists no entry for a token that ends inside a UTF-8 character and gives the next entry the
    whole character's bytes: where the hole is not filled, the rollout is checked up to it, the rest is counted
    unchecked."""
    oracle = tiny_oracle
    table, ids = TokenTable(oracle.tokenizer), chat_ids(oracle.tokenizer, PROMPTS[1])
    rollout = oracle_rollout(oracle, ids, 10)
    for entry, token in zip(rollout.path, oracle.greedy(ids, 10)):
        entry.id = token  # llama-server names each entry's id
    merged = rollout.path.pop(6)
    rollout.path[6].raw = merged.raw + rollout.path[6].raw
    positions, unchecked = teacher_forced(oracle, table, ids, rollout, stop_ids(oracle), "r")
    assert len(positions) == 6 and unchecked == 4 and max(p.error for p in positions) < 1e-4


def test_token_table_names_tokens_every_way_servers_do(tiny_oracle):
    tokenizer = tiny_oracle.tokenizer
    table = TokenTable(tokenizer)
    text = "The quick brown fox"
    ids = tokenizer.encode(text, add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert table.resolve(Entry(f"token_id:{ids[1]}", 0.0)) == ids[1]  # vLLM's names
    assert table.resolve(Entry("x", 0.0, id=ids[2])) == ids[2]  # llama-server's ids
    assert [table.resolve(Entry("", 0.0, table.bytes[i])) for i in ids] == ids  # OpenAI's bytes
    assert table.resolve(Entry("<|im_end|>", 0.0)) == im_end  # a special token by its text
    assert b"".join(table.bytes[i] for i in ids).decode() == text
    # "é" as two byte tokens (the byte-level alphabet has every byte), named only by lossy text (U+FFFD each):
    # the whole text settles which bytes they are
    split = [table.by_bytes[b][0] for b in ("é".encode()[:1], "é".encode()[1:])]
    path = [Entry("\ufffd", 0.0), Entry("\ufffd", 0.0)] + [Entry(table.bytes[i].decode(), 0.0) for i in ids]
    assert len(table.candidates(path[0])) > 100
    table.resolve_path(path, "é" + text)
    assert [e.id for e in path] == split + ids


def test_top_logprobs_steps_down_to_what_the_server_allows():
    server = Server("http://127.0.0.1:1")
    asked = []

    class Answer:
        def model_dump(self):
            return {"choices": [{"logprobs": {"content": []}}], "usage": {"prompt_tokens": 3}}

    def send(k, extra):
        asked.append(k)
        if k > 5:
            response = httpx2.Response(400, request=httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions"))
            raise openai.BadRequestError("top_logprobs too large", response=response,
                                         body={"error": {"message": f"top_logprobs must be <= 5, got {k}"}})
        return Answer()

    assert server._greedy("chat", send)[1] == {"prompt_tokens": 3}
    assert asked == [20, 10, 5] and server.top == {"chat": 5}
    server._greedy("chat", send)
    assert asked == [20, 10, 5, 5]  # found once per endpoint
