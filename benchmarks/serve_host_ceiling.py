"""How fast `lmbundle serve`'s host side streams tokens when the model costs nothing: the batch scheduler,
the request threads, detokenization and the HTTP event loop, with a stand-in for the batched step.

The server runs in this process on a tiny random checkpoint with `--max-batch` and no prefix cache; its
batched step (`DecoderForStep.step_rows`) is replaced by a sleep of --step-ms (the GPU's time, during
which the host prepares the next step) returning plain-letter tokens. Clients are `bench_serve.load`'s
streaming HTTP clients in other processes. If this ceiling is far above what the GPU server reaches at
the same concurrency, the host's per-token work is not what holds that server back.
  python benchmarks/serve_host_ceiling.py --clients 16 32 --step-ms 2.5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_serve import free_port, load, measured_load, wait_healthy  # noqa: E402
from lmbundle.convert.convert import convert  # noqa: E402
from lmbundle.models.decoder import DecoderForStep  # noqa: E402
from lmbundle.engine.engine import Engine  # noqa: E402
from lmbundle.serve.app import Options, serve  # noqa: E402
from tests import checkpoints  # noqa: E402


def stand_in_step(seconds: float):
    def step_rows(self, ids, positions, state, kv_len, ops):
        time.sleep(seconds)
        logits = torch.zeros(ids.shape[0], self.cfg.vocab_size)
        logits[torch.arange(ids.shape[0]), 40 + positions.cpu() % 50] = 1  # letters in the test vocabulary
        return logits
    return step_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--step-ms", type=float, default=2.5)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    DecoderForStep.step_rows = stand_in_step(args.step_ms / 1e3)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoints.make_qwen35_with_tokenizer(Path(tmp) / "ckpt", **checkpoints.TINY_CONFIGS["base"])
        bundle = convert(str(ckpt), Path(tmp) / "b", quant="fp16", backend="torch", log=None)
        port = free_port()
        engine = Engine(bundle, backend="torch", device="cpu", cache_bytes=0, max_batch=args.max_batch,
                        prefill_chunk=256)
        engine.warmup()
        options = Options(port=port, queue_size=256, timeout=900, max_batch=args.max_batch)
        serving = threading.Thread(target=serve, args=(engine, options), daemon=True)
        serving.start()
        host = f"127.0.0.1:{port}"
        wait_healthy(host, lambda: None if serving.is_alive() else "its thread ended (see above)")
        rows = []
        for clients in args.clients:
            load(host, clients, 1, args.prompt, 8, 200, seed=1)  # warm
            row = measured_load(host, clients, 2, args.prompt, args.max_tokens, 200, seed=clients)
            rows.append(row)
            shown = ("clients", "aggregate_tok_s", "ttft_p95_s", "scheduler")
            print(json.dumps({k: row[k] for k in shown}), flush=True)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python3", *sys.argv]), "cpus": os.cpu_count(), "step_ms": args.step_ms,
              "max_batch": args.max_batch, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve-host-ceiling-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
