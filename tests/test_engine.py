"""The pipelined engine and the CLI as a user drives them."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from lmbundle.convert.convert import convert
from lmbundle.engine.engine import Engine
from lmbundle.engine.outputs import StreamDecoder
from lmbundle.engine.request import Request
from lmbundle.engine.sampling import Sampling
from lmbundle.errors import LmbundleError
from lmbundle.gates.oracle import Oracle


@pytest.fixture(scope="module")
def fp16_bundle(tiny_qwen35, tmp_path_factory):
    return convert(str(tiny_qwen35), tmp_path_factory.mktemp("b") / "fp16", quant="fp16", backend="torch", log=None)


@pytest.fixture(scope="module")
def engine(fp16_bundle):
    return Engine(fp16_bundle, backend="torch", device="cpu")


def tokens(engine, ids, n, sampling=Sampling(), chunk=None):
    """Greedy (or `sampling`) tokens through the stop tokens, and the answer's figures."""
    done = engine.complete(Request(ids, max_tokens=n, sampling=sampling, ignore_eos=True, prefill_chunk=chunk))
    return done.tokens, done.stats


def test_greedy_equals_oracle_and_chunked_prefill(engine, tiny_qwen35):
    ids = engine.encode("Once upon a time there was a little cat")
    expected = Oracle(str(tiny_qwen35)).greedy(ids, 24)
    assert tokens(engine, ids, 24)[0] == expected
    assert tokens(engine, ids, 24, chunk=4)[0] == expected


def test_kv_grows_across_requests_without_changing_results(engine):
    ids = engine.encode("The quick brown fox")
    short = tokens(engine, ids, 8)[0]
    long_prompt = engine.encode("The quick brown fox " * 60)  # > 256 positions: a bigger KV chunk
    tokens(engine, long_prompt, 4)
    assert engine.backend.state.capacity >= 512
    assert tokens(engine, ids, 8)[0] == short


def test_next_turn_prefills_only_its_new_tokens_and_matches_the_oracle(engine, tiny_qwen35):
    oracle = Oracle(str(tiny_qwen35))
    first = engine.encode("Once upon a time")
    reply = tokens(engine, first, 6)[0]
    turn = first + reply + engine.encode(" and then the cat")
    for chunk in (0, 4):
        tokens(engine, first, 6)
        got, stats = tokens(engine, turn, 12, chunk=chunk)
        assert got == oracle.greedy(turn, 12)
        # the state after the reply (its last token was never fed); then this very turn, cached whole the
        # first time with its last token's logits: nothing left to prefill
        assert stats.cached_tokens == (len(first) + len(reply) - 1 if chunk == 0 else len(turn))
    # a prompt that does not extend what the state holds starts over
    assert tokens(engine, engine.encode("A small model speaks plain English"), 2)[1].cached_tokens == 0
    tokens(engine, first, 6)
    engine.backend.reset(8)  # anything else touched the state (the gates do): back to the prefix cache's copy
    got, touched = tokens(engine, turn, 12)
    assert got == oracle.greedy(turn, 12)
    assert touched.cached_tokens == len(turn)  # this very prompt ran above: restored whole, logits and all


def test_sampling_is_seeded_and_topk1_is_greedy(engine):
    ids = engine.encode("The old man")
    a = tokens(engine, ids, 16, Sampling(temperature=1.0, top_p=0.9, seed=7))[0]
    b = tokens(engine, ids, 16, Sampling(temperature=1.0, top_p=0.9, seed=7))[0]
    greedy = tokens(engine, ids, 16)[0]
    assert a == b
    assert tokens(engine, ids, 16, Sampling(temperature=0.8, top_k=1, seed=3))[0] == greedy
    for tiny in (1e-6, 1e-40, 5e-324):  # dividing by them overflowed the logits: "probability tensor contains nan"
        assert tokens(engine, ids, 16, Sampling(temperature=tiny, seed=3))[0] == greedy, tiny
    # at temperature 1e-4 (sampled) the logits are shifted before the division, so nothing overflows either
    assert len(tokens(engine, ids, 16, Sampling(temperature=1e-4, top_p=0.9, seed=3))[0]) == 16
    with pytest.raises(LmbundleError, match="top_p"):
        Sampling(top_p=0)


def test_stop_tokens_end_generation(engine):
    ids = engine.encode("The king")
    first = tokens(engine, ids, 1)[0][0]
    engine.stop_ids = engine.stop_ids | {first}
    try:
        done = engine.complete(Request(ids, max_tokens=10))
    finally:
        engine.stop_ids = engine.stop_ids - {first}
    assert done.tokens == [] and done.finish_reason == done.stats.stop_reason == "stop"


def test_context_too_long_before_any_work(engine):
    with pytest.raises(LmbundleError, match="context too long: 4000 prompt tokens \\+ 200 new tokens"):
        engine.generate(Request([5] * 4000, max_tokens=200))


def test_a_prompt_too_large_to_fit_is_refused_before_it_is_tokenized(engine, monkeypatch):
    """PromptBound: no token stands for more bytes than the bound says (so nothing that fits is refused), and
    a text past max_context of the longest tokens is refused on its size, the tokenizer never called."""
    from lmbundle.engine.outputs import token_bytes

    bound, tokenizer = engine.prompt_bound, engine.tokenizer
    sizes = {t: len(token_bytes(tokenizer, t)) for t in range(len(tokenizer))}
    assert bound.token_bytes >= max(sizes.values())
    text = tokenizer.decode([max(sizes, key=sizes.get)]) * (engine.max_context // 2)
    assert len(engine.encode(text)) <= engine.max_context  # near the bound, and it fits: not refused
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized"))
    monkeypatch.setattr(type(engine.tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenized"))
    huge = "The quick brown fox. " * (bound.limit // 10)
    for request in (Request(huge, max_tokens=4), Request(messages=[{"role": "user", "content": huge}], max_tokens=4)):
        with pytest.raises(LmbundleError, match="context too long: a prompt of .* bytes"):
            engine.generate(request)


def test_stream_decoder_matches_full_decode(engine):
    text = "Héllo wörld — a café by the sea 🌊 and more"
    ids = engine.encode(text)
    decoder = StreamDecoder(engine.tokenizer)
    assert "".join(decoder.push(t) for t in ids) == engine.tokenizer.decode(ids)
    assert decoder.flush() == ""
    split = engine.encode("é")[:1]  # a byte-level BPE can spell it with one token per byte
    held = StreamDecoder(engine.tokenizer)
    assert held.push(split[0]) + held.flush() == engine.tokenizer.decode(split)
    garbage = engine.encode("é")[1:2] * 40  # bytes that never make a character: streamed, not held to the end
    decoder = StreamDecoder(engine.tokenizer)
    streamed = "".join(decoder.push(t) for t in garbage)
    assert streamed and streamed + decoder.flush() == engine.tokenizer.decode(garbage)
    assert len(decoder.ids) - decoder.prefix <= 9  # a window of a few tokens is decoded per token, not all


def test_both_backends_speak_the_backend_protocol(engine):
    """One signature per Backend method (prefill above all) in both backends; the PyTorch one also resumes."""
    import inspect

    from lmbundle.engine.backend import Backend, ResumableBackend
    from lmbundle.engine.coreai_backend import CoreAIBackend
    from lmbundle.engine.torch_backend import TorchBackend

    def methods(protocol):
        return {name: inspect.signature(member) for name, member in vars(protocol).items()
                if callable(member) and not name.startswith("_")}

    def shape(signature):
        return [(p.name, p.kind, p.default) for p in signature.parameters.values()]

    assert "prefill" in methods(Backend) and "restore_prefix" in methods(ResumableBackend)
    for backend, protocols in ((TorchBackend, (Backend, ResumableBackend)), (CoreAIBackend, (Backend,))):
        for protocol in protocols:
            for name, signature in methods(protocol).items():
                assert shape(inspect.signature(getattr(backend, name))) == shape(signature), (backend, name)
    assert not CoreAIBackend.resumable and isinstance(engine.backend, ResumableBackend)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lmbundle", *args], capture_output=True, text=True, timeout=300)


def test_cli_run_streams_and_bench_reports(fp16_bundle, engine):
    out = _cli("run", str(fp16_bundle), "--prompt", "Once upon a time", "-g", "12", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    ids = engine.encode("Once upon a time")
    expected = engine.tokenizer.decode(engine.complete(Request(ids, max_tokens=12)).tokens, skip_special_tokens=True)
    assert out.stdout.rstrip("\n") == expected
    bench = _cli("bench", str(fp16_bundle), "-p", "16", "-g", "16", "-n", "2", "--json", "--device", "cpu")
    assert bench.returncode == 0, bench.stderr
    import json

    result = json.loads(bench.stdout)
    assert result["decode_tok_s"] > 0 and result["bytes_per_token"] > 0 and 0 < result["bandwidth_fraction"]
    assert result["prefill"] == "s1" and result["chunked_prefill"] == 256 and result["chunked_prefill_tok_s"] > 0
    assert result["cached_tokens"] == 0  # every trial timed the whole prompt, not a prefix-cache hit
    assert result["prompt_copies_bytes"] == 0  # the CPU expands int8 at load; copies for prompts are CUDA's


@pytest.mark.parametrize("args,message", [
    (["run", "/nonexistent/bundle", "--prompt", "x"], "error: /nonexistent/bundle: no such bundle folder"),
    (["convert", "/nonexistent/ckpt", "-o", "/tmp/never"], "error: /nonexistent/ckpt: no such checkpoint folder"),
    (["convert", "{ckpt}", "-o", "{tmp}/x", "--quant", "int4"], "error: unknown quant mode 'int4'"),
    (["run", "{bundle}", "--prompt", "word " * 5000], "error: context too long"),
    (["run", "{bundle}", "--prompt", "x", "--chunk", "0"], "error: --chunk must be at least 1 (got 0)"),
    (["serve", "{bundle}", "--chunk", "0", "--port", "1"], "error: --chunk must be at least 1 (got 0)"),
    (["convert", "{ckpt}", "-o", "/proc/lmbundle-test/out"], "error: /proc/lmbundle-test/out: cannot write the bundle"),
    (["run", "{bundle}", "--prompt", "x", "--device", "tpu"], "error: unknown device 'tpu'"),
    pytest.param(["run", "{bundle}", "--prompt", "x", "--device", "cuda"], "error: device 'cuda': no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
    (["run", "{bundle}", "--prompt", "x", "-g", "-5"], "error: -g/--max-new-tokens must be at least 1 (got -5)"),
    (["gate", "{bundle}", "--oracle", "{vl}"], "error: --oracle {vl}: a qwen3_vl checkpoint, but the bundle is"),
    (["convert", "Qwen/No-Such-Model", "-o", "{tmp}/x"], "error: cannot fetch hub model 'Qwen/No-Such-Model'"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message, fp16_bundle, tiny_qwen35, vl_checkpoint, tmp_path,
                                          monkeypatch):
    """Before, the convert into /proc, the devices and the other oracle ended in tracebacks, -g -5 in silence,
    and the offline hub error was cut mid-word without advice."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [a.format(ckpt=tiny_qwen35, tmp=tmp_path, bundle=fp16_bundle, vl=vl_checkpoint) for a in args]
    message = message.format(vl=vl_checkpoint)
    out = _cli(*args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith(message)
    assert "Traceback" not in out.stderr
    if "hub" in message:
        assert "hf download Qwen/No-Such-Model --local-dir DIR" in out.stderr and "HF_HUB_OFFLINE" in out.stderr


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    from tests import checkpoints

    folder = tmp_path_factory.mktemp("vl") / "qwen3-vl"
    checkpoints.make_vlm("qwen3_vl", folder)
    return folder


def test_cli_version_and_every_default_in_the_help():
    from lmbundle import __version__
    from lmbundle.cli import _Help, build_parser

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"lmbundle {__version__}"
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    help_of = _Help("lmbundle")._get_help_string
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.nargs != 0 and not action.required and action.dest != "help":
                assert "default" in help_of(action), (name, action.option_strings)
    run, serve = (" ".join(commands[c].format_help().split()) for c in ("run", "serve"))
    assert "at most (default: 128)" in run and "slots): one alone runs" in serve and "(default: 8)" in serve


def test_serve_without_its_web_modules_is_one_line(fp16_bundle):
    """A broken install (fastapi missing) names the module in one line, not an import traceback."""
    code = ("import sys; sys.modules['fastapi'] = None; from lmbundle.cli import main; "
            f"main(['serve', {str(fp16_bundle)!r}, '--port', '1'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: serve needs the module 'fastapi', which is not installed "
                                  "(pip install lmbundle's dependencies)")


@pytest.mark.parametrize("flag, solo", [((), True), (("--always-batched",), False)])
def test_serve_always_batched_reaches_the_cuda_options(flag, solo, fp16_bundle, monkeypatch):
    """`serve --always-batched` is CudaOptions(solo_step=False): every step batched on CUDA (bit-exact at any
    load); without it one request alone runs the one-request step."""
    import lmbundle.api
    import lmbundle.serve.server
    from lmbundle.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def load(source, **engine):
        seen.update(engine)
        raise Stop

    monkeypatch.setattr(lmbundle.api, "load", load)
    monkeypatch.setattr(lmbundle.serve.server, "serve", lambda *a: None)
    with pytest.raises(Stop):
        main(["serve", str(fp16_bundle), *flag])
    assert seen["cuda"].solo_step is solo and seen["max_batch"] == 8


def test_bench_prompt_is_plain_text(engine):
    """bench's synthetic prompt holds no special token: a chat marker would cut it into pieces for the
    prefix cache (the old `(17 + 31 i) mod 1000` ids held <|im_start|> and timed two pieces, not one)."""
    from lmbundle.engine.bench import prompt_ids

    ids = prompt_ids(engine, 300)
    marker = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert marker in [(17 + 31 * i) % 1000 for i in range(300)]  # the old prompt was cut there
    assert marker not in ids and not set(ids) & set(engine.tokenizer.all_special_ids) and len(set(ids)) > 200
    block = engine.prefix_cache.block
    assert engine.prefix_cache.cuts(ids, 0) == [p for p in range(1, 300) if p % block == 0]


def test_chat_ctrl_c_stops_the_answer_and_a_bad_image_is_said_once(fp16_bundle):
    """Before: Ctrl-C ended the session, /help was a message to the model, and a failed /image repeated its
    error on every later message (and took the previous reply out of the history)."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "lmbundle", "chat", str(fp16_bundle), "--device", "cpu",
                             "-g", "3000", "--temperature", "1", "--seed", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "/help for the commands" in proc.stdout.readline()
        proc.stdin.write("Once upon a time\n")
        proc.stdin.flush()
        started = proc.stdout.read(40)  # the prompt, then the answer streaming
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/help\n/image /no/such/picture.png\nThe king\n/quit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    out = started + out
    assert "(stopped)" in out and "/reset       start the conversation over" in out
    assert err.count("error:") == 1 and "no vision encoder" in err and "Traceback" not in err
    assert out.split("(stopped)")[1].count("> ") >= 3  # the prompt again after the stop, the help, the error
