"""`lmbundle serve`: a real server process on a tiny bundle, driven by the official openai client.

Answers are compared with the engine run in this process on the same prompt (greedy), not just
checked for shape. Load: 100 concurrent requests against a queue of 4 must end as 200s and 429s
only, leave the server serving, and leave its memory where it was.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import socket
import threading
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil
import pytest
from PIL import Image

from lmbundle.convert.convert import convert
from lmbundle.engine.outputs import StopStrings
from lmbundle.engine.request import Output, Request
from lmbundle.errors import LmbundleError
from lmbundle.serve.images import ImageError, decode_image_url
from lmbundle.serve.app import JobEvents, options_from
from lmbundle.serve.guard import check_host
from lmbundle.serve.schemas import ApiError
from lmbundle.serve.worker import Job, QueueFull, Worker
from tests.conftest import API_KEY, http_request, wait_idle

QUEUE_SIZE = 4
MAX_BATCH = 8  # serve's default
MAX_CONTEXT = 2048


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# the reference engine runs here on the main thread: a tiny model is ~10x slower there with 2 threads spinning
# against each other on a busy 2-core machine (the server decodes on its own threads)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle(tiny_qwen35, tmp_path_factory):
    return convert(str(tiny_qwen35), tmp_path_factory.mktemp("serve") / "tiny", quant="fp16", backend="torch",
                   max_context=MAX_CONTEXT, log=None)


@pytest.fixture(scope="module")
def server(bundle, serve):
    return serve(bundle, "--api-key", API_KEY, "--queue-size", str(QUEUE_SIZE), "--timeout", "60", "--cache-mem", "64M")


def reference(engine, ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    """Greedy text, token count and stop reason of the engine itself on the same prompt ids."""
    done = engine.complete(Request(ids, max_tokens=max_tokens))
    return done.text, done.stats.generated_tokens, done.finish_reason


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]


# -- the API -------------------------------------------------------------------------------------
def test_models_and_health(client, server, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [engine.name]
    assert models[0].model_extra["max_context"] == MAX_CONTEXT and models[0].model_extra["vision"] is False
    status, health = http_request("GET", server[1], "/health")
    assert status == 200 and health["status"] == "ok" and health["queue_size"] == QUEUE_SIZE
    assert health["max_batch"] == MAX_BATCH and health["prefix_cache"]["device_budget"] == 64 << 20


def test_metrics_in_prometheus_text(client, server, engine):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=4, temperature=0)
    client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=4, temperature=0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the answer leaves before its job is counted
        conn = http.client.HTTPConnection(server[1], timeout=30)
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 200 and response.getheader("content-type").startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        if samples[("lmbundle_requests_total", (("outcome", "served"),))] >= 2:
            break
        time.sleep(0.05)
    assert samples[("lmbundle_max_batch", ())] == MAX_BATCH
    assert samples[("lmbundle_requests_total", (("outcome", "served"),))] >= 2
    assert samples[("lmbundle_prefix_cache_hits_total", ())] >= 1
    assert samples[("lmbundle_cached_tokens_total", ())] >= len(engine.chat_ids(MESSAGES)) - 1
    assert samples[("lmbundle_prefix_cache_bytes", (("tier", "device"),))] > 0
    assert ("lmbundle_requests_waiting", ()) in samples and ("lmbundle_batch_size", ()) in samples
    assert samples[("lmbundle_batch_steps_total", ())] >= 3  # the second answer's 3 tokens after its first
    phases = {labels[0][1]: value for (name, labels), value in samples.items()
              if name == "lmbundle_scheduler_seconds_total"}
    assert set(phases) == {"admit", "prefill", "cache", "decode", "wait", "idle"}
    assert phases["decode"] > 0 and phases["prefill"] > 0 and phases["cache"] > 0
    assert http_request("GET", server[1], "/metrics", key=None)[0] == 401


def batch_steps(host: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = http_request("GET", host, "/metrics")[1]
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "lmbundle_batch_steps_total")


def test_eight_users_share_the_steps_and_get_their_solo_answers(server, client, engine):
    """The default server batches: 8 users at once take far fewer steps than their tokens (one step serves
    all), and each gets the tokens it gets alone (alone: the one-request step; together: the batched one)."""
    questions = ["The quick brown fox", "Once upon a time", "A small model", "The little cat",
                 "lived in a house by the sea", "plain English", "The lazy dog", "by the sea"]

    def ask(question):
        out = client.chat.completions.create(model=engine.name, max_tokens=16, temperature=0,
                                             messages=[{"role": "user", "content": question}])
        return out.choices[0].message.content, out.usage.completion_tokens

    alone = [ask(q) for q in questions]
    before = batch_steps(server[1])
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    steps = batch_steps(server[1]) - before
    tokens = sum(n for _, n in together)
    print(f"\n8 users at once: {tokens} tokens in {steps:.0f} steps")
    assert together == alone
    assert steps < tokens / 2


def test_interleaved_chats_keep_their_cache(client, engine):
    """Two conversations taking turns on one server: each next turn restores its own earlier turns
    (as cached_tokens), however many other requests ran in between; a shared system prompt is a hit too."""
    def ask(messages):
        out = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=6, temperature=0)
        return out.choices[0].message.content, out.usage.prompt_tokens_details.cached_tokens

    system = {"role": "system", "content": "You are a careful assistant for the little cat by the sea."}
    a = [system, {"role": "user", "content": "Once upon a time"}]
    b = [system, {"role": "user", "content": "The quick brown fox"}]
    reply_a, _ = ask(a)
    reply_b, shared = ask(b)
    start = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    system_len = [p for p, t in enumerate(engine.chat_ids(b)) if t == start][1]
    assert shared >= system_len  # b's system prompt came from a's request
    for _ in range(2):  # at least the previous prompt (all of the reply too where it re-tokenizes the same)
        before_a, before_b = len(engine.chat_ids(a)), len(engine.chat_ids(b))
        a += [{"role": "assistant", "content": reply_a}, {"role": "user", "content": "And then?"}]
        b += [{"role": "assistant", "content": reply_b}, {"role": "user", "content": "Why?"}]
        reply_a, cached_a = ask(a)
        reply_b, cached_b = ask(b)
        assert cached_a >= before_a - 1 and cached_b >= before_b - 1, (cached_a, before_a, cached_b, before_b)


def test_chat_greedy_equals_engine(client, engine):
    text, n, reason = reference(engine, engine.chat_ids(MESSAGES), 12)
    out = client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == reason
    assert out.usage.prompt_tokens == len(engine.chat_ids(MESSAGES))
    assert out.usage.completion_tokens == n and out.usage.total_tokens == len(engine.chat_ids(MESSAGES)) + n


def test_next_turn_reports_cached_prompt_tokens_like_the_engine(client, engine):
    """A conversation's next request: the server's engine prefills only what its state does not hold and
    says so in usage.prompt_tokens_details, as the engine itself does for the same two calls."""
    first_text, _, _ = reference(engine, engine.chat_ids(MESSAGES), 8)
    turn = MESSAGES + [{"role": "assistant", "content": first_text}, {"role": "user", "content": "And then?"}]
    done = engine.complete(Request(engine.chat_ids(turn), max_tokens=8))
    text, stats = done.text, done.stats
    first = client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=8, temperature=0)
    assert first.choices[0].message.content == first_text
    out = client.chat.completions.create(model=engine.name, messages=turn, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == text
    assert out.usage.prompt_tokens_details.cached_tokens == stats.cached_tokens > 0


def test_chat_stream_equals_engine(client, engine):
    text, n, reason = reference(engine, engine.chat_ids(MESSAGES), 12)
    chunks = list(client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [reason]
    assert finals[0].model_extra["timings"]["decode_tok_s"] >= 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert len({c.id for c in chunks}) == 1


def test_completions_equal_engine(client, engine):
    prompt = "Once upon a time"
    text, n, reason = reference(engine, engine.encode(prompt), 10)
    out = client.completions.create(model=engine.name, prompt=prompt, max_tokens=10, temperature=0)
    assert out.choices[0].text == text and out.choices[0].finish_reason == reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(engine.encode(prompt)), n)
    streamed = client.completions.create(model=engine.name, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_stop_string_cuts_text_and_generation(client, engine):
    full, _, _ = reference(engine, engine.chat_ids(MESSAGES), 24)
    visible = full.replace("\ufffd", "")
    assert len(visible) >= 6, f"tiny model gave too little text to pick a stop string from: {full!r}"
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    expected = full[: full.find(stop)]
    out = client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=24, temperature=0,
                                         stop=[stop, "never-appears"])
    assert out.choices[0].message.content == expected and out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=24, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_seeded_sampling_repeats(client, engine):
    def sampled(seed):
        return client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                              top_p=0.9, seed=seed).choices[0].message.content
    assert sampled(7) == sampled(7)


# -- bad input -----------------------------------------------------------------------------------
def test_malformed_json_and_bad_fields(server):
    status, body = http_request("POST", server[1], "/v1/chat/completions", body=b'{"messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert body["error"]["type"] == "invalid_request_error"
    status, body = http_request("POST", server[1], "/v1/chat/completions", body={"messages": "hi"})
    assert status == 400 and body["error"]["param"].startswith("messages")
    status, body = http_request("POST", server[1], "/v1/chat/completions",
                           body={"messages": MESSAGES, "temperature": -1})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = http_request("POST", server[1], "/v1/chat/completions", body={"messages": MESSAGES, "n": 3})
    assert status == 400
    status, body = http_request("GET", server[1], "/v1/nothing-here")
    assert status == 404 and "error" in body


def test_foreign_host_and_non_json_posts_are_refused(server):
    port = server[1].rsplit(":", 1)[1]
    status, body = http_request("GET", server[1], "/v1/models", Host=f"attacker.example:{port}")
    assert status == 403 and body["error"]["code"] == "forbidden_host"  # DNS rebinding
    assert http_request("GET", server[1], "/v1/models", Host=f"localhost:{port}")[0] == 200
    status, body = http_request("POST", server[1], "/v1/completions", body={"prompt": "x"}, Content_Type="text/plain")
    assert status == 415  # what a cross-site form could send without a CORS preflight


def test_api_key_required_but_page_public(server):
    status, body = http_request("GET", server[1], "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert http_request("GET", server[1], "/health", key="wrong") == (200, {"status": "ok"})  # load balancers
    status, page = http_request("GET", server[1], "/", key=None)
    assert status == 200 and "<title>lmbundle chat</title>" in page
    assert http_request("GET", server[1], "/static/app.js", key=None)[0] == 200


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"


def test_prompt_past_the_context_is_400(client, engine):
    long = "The quick brown fox jumps over the lazy dog. " * 250
    assert len(engine.encode(long)) > MAX_CONTEXT
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=engine.name, prompt=long, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded" and "context too long" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # fits alone, not with the requested output
        client.chat.completions.create(model=engine.name, messages=MESSAGES, max_tokens=MAX_CONTEXT)


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]}]


def chat_error(client, engine, messages) -> dict:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=engine.name, messages=messages, max_tokens=2)
    return err.value.body


def test_images_to_a_text_bundle_are_refused_before_decoding(client, engine):
    """A text-only bundle refuses any image part at once, however large or broken (the VLM limits are in
    test_serve_limits.py)."""
    huge = png_data_url(Image.new("RGB", (7000, 7000), "white"))
    start = time.monotonic()
    for url in (huge, "data:image/png;base64,AAAA", "https://example.com/cat.png"):
        assert "this bundle has no vision encoder" in chat_error(client, engine, image_message(url))["message"]
    assert time.monotonic() - start < 3


def test_valid_image_to_text_bundle_is_400(client, engine):
    body = chat_error(client, engine, image_message(png_data_url(Image.new("RGB", (32, 32), "blue"))))
    assert "this bundle has no vision encoder" in body["message"]


def test_file_urls_only_inside_allowed_folders(tmp_path):
    inside, outside = tmp_path / "allowed", tmp_path / "other"
    inside.mkdir(), outside.mkdir()
    Image.new("RGB", (20, 10), "green").save(inside / "ok.png")
    Image.new("RGB", (20, 10), "green").save(outside / "no.png")
    (inside / "link.png").symlink_to(outside / "no.png")
    assert decode_image_url(f"file://{inside / 'ok.png'}", [inside]).size == (20, 10)
    for path in (outside / "no.png", inside / "link.png", inside / ".." / "other" / "no.png"):
        with pytest.raises(ImageError, match="outside"):
            decode_image_url(f"file://{path}", [inside])
    with pytest.raises(ImageError, match="disabled"):
        decode_image_url(f"file://{inside / 'ok.png'}", [])


# -- load, disconnects, memory ----------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation(server, engine, stream):
    host = server[1]
    before = http_request("GET", host, "/health")[1]["stopped"]
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("POST", "/v1/chat/completions",
                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
                 body=json.dumps({"messages": MESSAGES, "stream": stream, "max_tokens": MAX_CONTEXT - 100,
                                  "temperature": 0.8, "seed": 1,  # the stop tokens barred: it cannot end by itself
                                  "logit_bias": {str(t): -100 for t in engine.stop_ids}}))
    if stream:
        response = conn.getresponse()
        assert response.status == 200
        response.fp.readline()  # the first event arrived: decoding has started
    else:
        deadline = time.monotonic() + 20
        while not http_request("GET", host, "/health")[1]["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = http_request("GET", host, "/health")[1]
        if health["stopped"] > before and not health["running"]:
            break
        time.sleep(0.05)
    assert health["stopped"] == before + 1 and not health["running"]


def test_100_concurrent_requests_bounded_queue_and_memory(server, engine):
    proc, host = server
    body = {"model": engine.name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    for _ in range(3):  # steady state before measuring
        assert http_request("POST", host, "/v1/chat/completions", body=body)[0] == 200
    rss_before = rss_mb(proc.pid)
    start = time.monotonic()
    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(lambda _: http_request("POST", host, "/v1/chat/completions", body=body), range(100)))
    seconds = time.monotonic() - start
    statuses = [status for status, _ in results]
    ok, busy = statuses.count(200), statuses.count(429)
    print(f"\n100 concurrent: {ok} x 200, {busy} x 429 in {seconds:.2f} s; "
          f"RSS {rss_before:.1f} -> {rss_mb(proc.pid):.1f} MB")
    assert ok + busy == 100 and ok >= 1 and busy >= 1, statuses
    assert all(b["error"]["code"] == "queue_full" for s, b in results if s == 429)
    texts = {b["choices"][0]["message"]["content"] for s, b in results if s == 200}
    assert len(texts) == 1  # every admitted greedy request got the same answer
    assert http_request("POST", host, "/v1/chat/completions", body=body)[0] == 200  # still serving
    health = wait_idle(host)
    assert health["waiting"] == 0 and not health["running"]
    assert rss_mb(proc.pid) < rss_before + 40


def test_an_oversized_prompt_is_refused_at_once_and_stalls_no_one(server, engine):
    """A 30 MB message (under the 32 MB body limit) while another user asks a small question, three times.
    Before: the 30 MB were tokenized in full before the context check (63 s to its 400, RSS 4.7 GB, 2.4 GB
    kept) on a decode worker, and the small request waited behind it. Now the prompt's size is bounded
    before it is tokenized (engine/prompt.py, PromptBound), prompts are built off the decode workers, and
    a large body's memory is given back."""
    proc, host = server
    process = psutil.Process(proc.pid)
    small = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    expected = http_request("POST", host, "/v1/chat/completions", body=small)[1]["choices"][0]["message"]
    before = process.memory_info().rss
    text = "The quick brown fox jumps over the lazy dog. " * (30 * 2**20 // 45)
    payload = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()

    def timed(body):
        start = time.monotonic()
        return *http_request("POST", host, "/v1/chat/completions", body=body), time.monotonic() - start

    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            big = pool.submit(timed, payload)
            time.sleep(0.05)
            other = pool.submit(timed, small)
            (status, body, big_seconds), (other_status, other_body, other_seconds) = big.result(), other.result()
        wait_idle(host)
        after = process.memory_info().rss
        print(f"\n{len(payload) / 2**20:.0f} MB message: HTTP {status} in {big_seconds:.2f} s, RSS "
              f"{before / 2**20:.0f} -> {after / 2**20:.0f} MB; the other user's request: {other_seconds:.2f} s")
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert "bytes" in body["error"]["message"]  # refused on its size, before any tokenizing (the 63 s went there)
        assert other_status == 200 and other_body["choices"][0]["message"] == expected
        assert after - before < 150 * 2**20  # a few copies of the body at most, given back: no growth


# -- parts, in process ----------------------------------------------------------------------------
@pytest.mark.parametrize("pieces", [["ab", "cST", "OPde"], ["abcS", "T", "O", "Pde"], ["abcSTOPde"]])
def test_stop_matcher_cuts_at_first_stop_over_any_split(pieces):
    matcher = StopStrings(["STOP", "zz"])
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.push(piece)
        out += text
        if hit:
            break
    assert (out, hit) == ("abc", True)
    matcher = StopStrings(["STOP"])
    assert matcher.push("xxST") == ("xx", False) and matcher.push("x") == ("STx", False)
    assert matcher.push("S") == ("", False) and matcher.flush() == "S"


def test_worker_is_fifo_bounded_and_stops_late_jobs():
    async def scenario():
        worker = Worker(queue_size=2)
        order = []

        def slow(tag, seconds):
            def work(job):
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    job.check()
                    time.sleep(0.005)
                order.append(tag)
            return work

        first = worker.submit(slow("a", 0.2), timeout=10)
        await asyncio.sleep(0.05)  # "a" is running, the queue is empty
        worker.submit(slow("b", 0.01), timeout=10)
        late = worker.submit(slow("c", 5), timeout=0.3)
        with pytest.raises(QueueFull):
            worker.submit(slow("d", 0), timeout=10)
        while (await late.events.get()).kind != "end":
            pass
        assert (await first.events.get()).kind == "end"
        worker.close()
        return order, worker.stopped

    order, stopped = asyncio.run(scenario())
    assert order == ["a", "b"] and stopped == 1  # "c" ran past its time limit and was stopped


def test_outputs_emitted_while_the_loop_is_busy_arrive_as_one_event_in_order():
    outputs = [Output(1, "a"), Output(2, "b"), Output(None, "c", finish_reason="length")]

    async def scenario():
        job = Job(lambda job: None, asyncio.get_running_loop(), time.monotonic() + 10)

        def work():
            job.emit("prompt", "p")
            for output in outputs:
                job.emit("output", output)
            job.emit("end")

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()  # the loop is held: every event is still on its way
        events = [await job.events.get() for _ in range(3)]
        return [(e.kind, e.value) for e in events], job.events.empty()

    assert asyncio.run(scenario()) == ([("prompt", "p"), ("outputs", outputs), ("end", None)], True)


def test_worker_without_queue_runs_one_at_a_time():
    async def scenario():
        worker = Worker(queue_size=0)
        first = worker.submit(lambda job: time.sleep(0.2), timeout=10)
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            worker.submit(lambda job: None, timeout=10)
        while (await first.events.get()).kind != "end":
            pass
        second = worker.submit(lambda job: job.emit("prompt", "ran"), timeout=10)
        kinds = [(await second.events.get()).kind for _ in range(2)]
        worker.close()
        return kinds

    assert asyncio.run(scenario()) == ["prompt", "end"]


def test_request_side_time_limit_is_504():
    """A job still waiting (or silent) when its time is up answers 504."""
    class Connected:
        async def is_disconnected(self):
            return False

    async def scenario():
        job = Job(lambda j: None, asyncio.get_running_loop(), time.monotonic() + 0.3)
        with pytest.raises(ApiError) as err:
            await JobEvents(job, Connected(), 0.3, watch=True).next()
        return err.value

    error = asyncio.run(scenario())
    assert error.status == 504 and error.body()["error"]["code"] == "timeout"


def test_remote_host_needs_allow_remote():
    assert check_host("127.0.0.1", False) and check_host("::1", False) and check_host("localhost", False)
    with pytest.raises(LmbundleError, match="--allow-remote"):
        check_host("0.0.0.0", False)
    assert check_host("0.0.0.0", True) is False
    args = Namespace(host="192.168.1.20", allow_remote=False, bundle="unused", port=1)
    with pytest.raises(LmbundleError, match="refusing to listen on 192.168.1.20"):
        options_from(args)  # `lmbundle serve` checks its options before it opens the bundle


# -- connections: read timeouts, the connection cap, the open-file limit -----------------------------------
def first_line(sock: socket.socket) -> bytes:
    """The first line the server sends on `sock` (b"" if it closes without answering)."""
    data = b""
    while b"\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    return data.split(b"\r\n", 1)[0]


def test_half_sent_requests_are_dropped_and_connections_capped(bundle, serve):
    """Its own server, with a 1 s read timeout, 20 connections at most, and an open-file limit of 256 (as
    `ulimit -n 256` would set). Before: a half-sent request held its connection for as long as the client
    liked, and ~1,000 of them exhausted the descriptors (EMFILE tracebacks, everyone locked out)."""
    proc, host = serve(bundle, "--api-key", API_KEY, "--read-timeout", "1", "--max-connections", "20",
                       open_files=256)
    address = (host.rsplit(":", 1)[0], int(host.rsplit(":", 1)[1]))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n".encode()
    with socket.create_connection(address, timeout=10) as headers_only:  # the headers never end
        headers_only.sendall(head)
        assert first_line(headers_only) == b"HTTP/1.1 408 Request Timeout" and headers_only.recv(4096) == b""
    with socket.create_connection(address, timeout=10) as short_body:  # 10 of the 100 bytes it announced
        short_body.sendall(head + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"prompt":')
        assert first_line(short_body) == b"HTTP/1.1 408 Request Timeout"
    sockets = [socket.create_connection(address, timeout=10) for _ in range(300)]  # more than 256 descriptors
    try:
        answers = [first_line(s) for s in sockets]
    finally:
        for s in sockets:
            s.close()
    busy, late = answers.count(b"HTTP/1.1 503 Service Unavailable"), answers.count(b"HTTP/1.1 408 Request Timeout")
    print(f"\n300 idle connections, an open-file limit of 256: {busy} refused at once (503), {late} dropped after "
          "the read timeout (408)")
    assert busy and busy + late == 300  # every one answered, none reset or left hanging
    status, _ = http_request("POST", host, "/v1/completions", body={"prompt": "Once", "max_tokens": 2})
    assert status == 200  # still serving
    proc.terminate()
    output = proc.communicate(timeout=30)[0]
    assert "Traceback" not in output and "Too many open files" not in output, output


def test_connection_limits_fit_the_open_file_limit(monkeypatch):
    """The cap is lowered to what the descriptors left allow: a batch of accepts, the connections served
    and as many again refused politely all fit at once (with a soft limit of 256 raised to a hard 4096)."""
    import resource

    from lmbundle.serve import server

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, 4096))
    raised = []
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: raised.append(limits))
    monkeypatch.setattr(server.os, "listdir", lambda path: ["fd"] * 40)
    limits = server.Limits.fitting(10_000)
    assert raised == [(4096, 4096)]
    assert limits.cap <= limits.refuse_at // 2 and limits.refuse_at + limits.backlog <= 4096 - 40 - server.RESERVED_FDS
    assert limits.cap > 1000 and server.Limits.fitting(50).cap == 50
