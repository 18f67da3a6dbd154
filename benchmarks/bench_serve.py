"""`lmbundle serve` under load: aggregate tok/s, p50/p95 latency and time to first token at N concurrent
clients, batched (--max-batch) against one request at a time, and a chat workload's prefix cache hits.

A real HTTP load generator: each client is a thread with its own connection that sends streaming
/v1/completions requests back to back (prompt of --prompt random token ids, distinct per request, so
nothing is cached; --max-tokens generated, greedy; a random-weight model never stops early) and times
the first streamed text and the end. The chat workload: --chat-users users share one system prompt and
take --turns turns each (every turn sends the whole conversation), reporting
usage.prompt_tokens_details.cached_tokens. Exactness: 8 different greedy prompts alone, then all at once.
`--cache-mem 8G 40G` runs the batched levels once per prefix-cache budget, side by side (spills or none).

Usage (GPU): python benchmarks/bench_serve.py --config Qwen3.5-2B --quant int8hu --clients 1 4 16 32 \
    --max-batch 32 --tokenizer DIR  (DIR: a tokenizer.json + tokenizer_config.json + chat_template.jinja to
    use instead of the small stand-in, e.g. the real Qwen3.5 vocabulary). The lent GPU machine lacks the server's
    packages and has no network: run scripts/fetch_serve_wheels.sh here, carry `.serve`, and there first
    `python3 -m pip install -q --no-index --find-links .serve/wheels fastapi uvicorn prometheus-client pillow py-spy`
    (py-spy only for --py-spy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(host: str, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def start_server(bundle: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmbundle", "serve", str(bundle), "--port", str(port),
                             "--backend", "torch", "--timeout", "900", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    host = f"127.0.0.1:{port}"
    try:
        wait_healthy(host, lambda: None if proc.poll() is None else proc.stdout.read()[-3000:])
    except RuntimeError:
        proc.kill()
        raise
    return proc, host


def wait_healthy(host: str, ended: Callable[[], str | None], timeout: float = 300) -> None:
    """Until the server at `host` answers /health; `ended()` says why it is gone (None while it runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (why := ended()) is not None:
            raise RuntimeError(f"server exited: {why}")
        try:
            if get(host, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start")


def stop_server(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def stream(host: str, path: str, body: dict) -> dict:
    """One streamed request: TTFT (first text), latency, completion tokens, cached prompt tokens, text.
    The stream is read in blocks of whatever has arrived, not line by line: http.client's line reads
    over a chunked body cost the client more than the server spends on a token."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    conn = http.client.HTTPConnection(host, timeout=900)
    start, began = time.perf_counter(), time.time()
    first, text, usage, status = None, [], {}, None
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        status = response.status
        if status != 200:
            return {"status": status, "error": response.read().decode()[:300], "began": began, "ended": time.time()}
        pending = b""
        while block := response.read1(1 << 16):
            *events, pending = (pending + block).split(b"\n\n")
            for raw in events:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
                if event.get("usage"):
                    usage = event["usage"]
    finally:
        conn.close()
    end = time.perf_counter()
    return {"status": status, "ttft": (first or end) - start, "latency": end - start, "began": began,
            "ended": began + end - start,
            "tokens": usage.get("completion_tokens", 0), "prompt_tokens": usage.get("prompt_tokens", 0),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0), "text": "".join(text)}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else 0.0


def clients_process(host: str, indices: list[int], per_client: int, prompt: int, max_tokens: int, vocab: int,
                    seed: int, go: float) -> list[dict]:
    """Clients `indices` as threads of one process, from time.time() == go: each sends its requests back
    to back (prompts of random ids, distinct per request)."""
    results, lock = [], threading.Lock()

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        for _ in range(per_client):
            ids = [rng.randrange(vocab) for _ in range(prompt)]
            r = stream(host, "/v1/completions", {"prompt": ids, "max_tokens": max_tokens, "temperature": 0})
            r.pop("text", None)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in indices]
    time.sleep(max(0.0, go - time.time()))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def load(host: str, clients: int, per_client: int, prompt: int, max_tokens: int, vocab: int, seed: int) -> dict:
    """`clients` concurrent streaming clients, spread over processes (one Python process's GIL could not
    read 32 streams at the server's pace: the load generator, not the server, set the figures)."""
    processes = max(1, min(clients, (os.cpu_count() or 2) // 2, 8))
    groups = [list(range(clients))[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        go = time.time() + 1.0  # every process started and waiting
        pending = [pool.apply_async(clients_process, (host, g, per_client, prompt, max_tokens, vocab, seed, go))
                   for g in groups]
        results = [r for p in pending for r in p.get()]
    wall = max(r["ended"] for r in results) - min(r["began"] for r in results)
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "ok": len(ok), "wall_s": round(wall, 3),
            "generated_tokens": tokens, "aggregate_tok_s": round(tokens / wall, 1),
            "latency_p50_s": round(pct([r["latency"] for r in ok], 0.5), 3),
            "latency_p95_s": round(pct([r["latency"] for r in ok], 0.95), 3),
            "ttft_p50_s": round(pct([r["ttft"] for r in ok], 0.5), 3),
            "ttft_p95_s": round(pct([r["ttft"] for r in ok], 0.95), 3),
            "per_request_tok_s_p50": round(pct([(r["tokens"] - 1) / max(r["latency"] - r["ttft"], 1e-9)
                                               for r in ok if r["tokens"] > 1], 0.5), 1),
            "errors": sorted({r.get("error", "")[:120] for r in results if r["status"] != 200})}


def chat(host: str, users: int, turns: int, max_tokens: int) -> dict:
    system = ("You are a helpful assistant for a city library. Answer questions about opening hours, loans, "
              "renewals, fines, events, study rooms and the catalogue. Be concise, friendly and exact. ") * 6
    questions = ["When do you open on Sundays?", "How many books can I borrow?", "Can I renew a loan online?",
                 "Is there a study room free today?", "What events are on this week?"]
    per_turn = [[] for _ in range(turns)]
    lock = threading.Lock()

    def user(index: int) -> None:
        messages = [{"role": "system", "content": system}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"(user {index}) {questions[(index + turn) % len(questions)]}"})
            r = stream(host, "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens,
                                                       "temperature": 0})
            messages.append({"role": "assistant", "content": r.get("text", "")})
            with lock:
                per_turn[turn].append(r)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = []
    for turn, results in enumerate(per_turn):
        ok = [r for r in results if r["status"] == 200]
        prompt = sum(r["prompt_tokens"] for r in ok)
        cached = sum(r["cached"] for r in ok)
        rows.append({"turn": turn + 1, "ok": len(ok), "prompt_tokens": prompt, "cached_tokens": cached,
                     "cached_fraction": round(cached / max(prompt, 1), 3),
                     "ttft_p50_s": round(pct([r["ttft"] for r in ok], 0.5), 3),
                     "ttft_p95_s": round(pct([r["ttft"] for r in ok], 0.95), 3),
                     "errors": sorted({r.get("error", "")[:120] for r in results if r["status"] != 200})})
    return {"users": users, "turns": rows}


def exactness(host: str, vocab: int, max_tokens: int) -> dict:
    rng = random.Random(7)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(20, 300))] for _ in range(8)]
    body = lambda ids: {"prompt": ids, "max_tokens": max_tokens, "temperature": 0}  # noqa: E731
    alone = [stream(host, "/v1/completions", body(p))["text"] for p in prompts]
    together = [None] * len(prompts)

    def run(i):
        together[i] = stream(host, "/v1/completions", body(prompts[i]))["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"prompts": len(prompts), "identical": sum(a == b for a, b in zip(alone, together))}


def metrics(host: str) -> dict:
    status, text = get(host, "/metrics")
    keep = ("lmbundle_prefix_cache", "lmbundle_cached_tokens", "lmbundle_prompt_tokens", "lmbundle_generated",
            "lmbundle_scheduler_seconds", "lmbundle_batch_steps")
    return {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
            if line.startswith(keep)} if status == 200 else {}


def measured_load(host: str, clients: int, per_client: int, prompt: int, max_tokens: int, vocab: int,
                  seed: int) -> dict:
    """`load`, with where the batch scheduler's time went meanwhile (`row["scheduler"]`, from /metrics)."""
    before, began = metrics(host), time.perf_counter()
    row = load(host, clients, per_client, prompt, max_tokens, vocab, seed)
    row["scheduler"] = scheduler_split(before, metrics(host), time.perf_counter() - began)
    return row


def scheduler_split(before: dict, after: dict, wall: float) -> dict:
    """Where the batch scheduler's time went between two /metrics reads `wall` seconds apart: seconds per
    phase, steps, and what is left (the thread between phases, or waiting for the GIL)."""
    phases = {key.split('"')[1]: round(after[key] - before.get(key, 0.0), 3)
              for key in after if key.startswith("lmbundle_scheduler_seconds_total")}
    if not phases:
        return {}
    steps = after.get("lmbundle_batch_steps_total", 0) - before.get("lmbundle_batch_steps_total", 0)
    return {"seconds": phases, "unaccounted_s": round(wall - sum(phases.values()), 3), "steps": int(steps),
            "decode_ms_per_step": round(1e3 * phases.get("decode", 0.0) / max(steps, 1), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="Qwen3.5-2B")
    parser.add_argument("--quant", default="int8hu")
    parser.add_argument("--bundle", help="an existing bundle (skips building the checkpoint)")
    parser.add_argument("--tokenizer", help="tokenizer files to put in the checkpoint")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--baseline-clients", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=2, help="requests each client sends")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--chat-users", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256, help="the server's --chunk: prompt pieces and cache block")
    parser.add_argument("--cache-mem", nargs="+", default=["8G"],
                        help="prefix cache device budgets: the batched levels run once for each, side by side")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--py-spy", action="store_true",
                        help="record which server threads hold the GIL during each batched level (py-spy on PATH): "
                             "raw samples next to the JSON, the busiest functions printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:  # 4.5 GB a 2B checkpoint + bundle
        run(args, Path(tmp))


def gil_recording(pid: int, path: Path) -> subprocess.Popen:
    """py-spy sampling the server's threads that hold the GIL (--nonblocking: its default pauses the server)."""
    return subprocess.Popen(["py-spy", "record", "--nonblocking", "--gil", "--threads", "--rate", "250",
                             "--format", "raw", "--output", str(path), "--pid", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def gil_summary(path: Path, top: int = 12) -> dict:
    """Share of the GIL samples by thread and by function (inclusive) from py-spy's raw output."""
    threads, functions, total = {}, {}, 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        threads[frames[0]] = threads.get(frames[0], 0) + n
        for name in {frame.split(" (")[0] for frame in frames[1:]}:
            functions[name] = functions.get(name, 0) + n
    share = lambda counts: {k: round(v / max(total, 1), 3)  # noqa: E731
                            for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:top]}
    return {"samples": total, "threads": share(threads), "functions": share(functions)}


def run(args, tmp: Path) -> None:
    import torch

    t0 = time.perf_counter()
    bundle = args.bundle
    if bundle is None:
        from benchmarks.bench_decode import make_checkpoint
        from lmbundle.convert.convert import convert

        ckpt = make_checkpoint(tmp / "ckpt", args.config, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if args.tokenizer:
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                if (Path(args.tokenizer) / name).exists():
                    shutil.copy(Path(args.tokenizer) / name, ckpt / name)
        bundle = convert(str(ckpt), tmp / args.quant, quant=args.quant, backend="torch", log=None)
        print(f"checkpoint + {args.quant} bundle in {time.perf_counter() - t0:.0f} s", flush=True)
    from transformers import AutoTokenizer

    tokenizer = Path(bundle) / "tokenizer"
    vocab = min(len(AutoTokenizer.from_pretrained(str(tokenizer))) if tokenizer.exists() else 512, 200000)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python3", *sys.argv]), "config": args.config if args.bundle is None else None,
              "bundle": Path(bundle).name,
              "quant": args.quant if args.bundle is None else json.loads((Path(bundle) / "metadata.json").read_text())[
                  "lmbundle"]["quant"]["mode"], "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "prompt_tokens": args.prompt, "max_tokens": args.max_tokens, "per_client": args.per_client,
              "max_batch": args.max_batch, "cache_mem": args.cache_mem, "chunk": args.chunk,
              "batched": [], "batch1": []}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    model = f"{args.config}-{args.quant}" if args.bundle is None else Path(bundle).name  # a bundle: its own name
    path = args.out / f"serve-{model}-{stamp}.json"

    def save() -> None:  # after every measurement: a run cut short keeps what it measured
        base = report["batch1"][0]["aggregate_tok_s"] if report["batch1"] else None
        for row in report["batched"]:
            if base:
                row["x_batch1"] = round(row["aggregate_tok_s"] / base, 2)
        path.write_text(json.dumps(report, indent=2) + "\n")
    passes = [("batched", args.max_batch, args.clients, cache) for cache in args.cache_mem]
    passes.append(("batch1", 1, args.baseline_clients, args.cache_mem[0]))
    for index, (label, max_batch, levels, cache) in enumerate(passes):
        if not levels:
            continue
        proc, host = start_server(bundle, "--max-batch", str(max_batch), "--queue-size", "256", "--cache-mem", cache,
                                  "--chunk", str(args.chunk))
        try:
            for clients in levels:  # warm: CUDA graphs per batch bucket and window, the dense weights
                load(host, clients, 1, args.prompt, 8, vocab, seed=99)
            for clients in levels:
                spied = path.with_name(f"{path.stem}-cache{cache}-c{clients}-gil.txt")
                recording = gil_recording(proc.pid, spied) if args.py_spy and label == "batched" else None
                row = measured_load(host, clients, args.per_client, args.prompt, args.max_tokens, vocab, seed=clients)
                row["cache_mem"] = cache
                if recording is not None:
                    recording.send_signal(signal.SIGINT)  # py-spy writes its samples when interrupted
                    recording.wait(timeout=60)
                    row["gil"] = gil_summary(spied)
                report[label].append(row)
                save()
                print(label, json.dumps(row), flush=True)
            if index == 0:  # the first batched pass
                report["exactness"] = exactness(host, vocab, 32)
                print("exactness", report["exactness"], flush=True)
                if args.chat_users:
                    report["chat"] = chat(host, args.chat_users, args.turns, 32)
                    print("chat", json.dumps(report["chat"]), flush=True)
                report["metrics"] = metrics(host)
                save()
        finally:
            log = stop_server(proc)
            if any(row.get("errors") for row in report[label] if row["cache_mem"] == cache):
                print(log[-3000:])
    save()
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
