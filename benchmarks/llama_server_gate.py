"""`lmbundle gate --server` against llama-server: a second engine on the same checkpoint, held to the fp32 oracle.

llama-server comes from the same llama.cpp source as benchmarks/llama_cpp.py (llama-cpp-python's source archive).
Each checkpoint is converted to GGUF by llama.cpp's own converter at each --outtype (named `<checkpoint>-<outtype>`,
so the name declares the precision class: bf16, q8_0 -> int8), served by llama-server on a loopback port, and gated;
the JSON reports go to benchmarks/results/<start>-llama-server-gate.json.

  here:   python benchmarks/llama_cpp.py fetch && scripts/fetch_serve_wheels.sh     (carry .llama and .serve)
  there:  python3 -m pip install -q --no-index --find-links .serve/wheels openai
          python3 benchmarks/llama_server_gate.py --checkpoint lmbundle/data/demo/qwen35-tiny --fresh
  CPU:    python benchmarks/llama_server_gate.py --cpu --checkpoint lmbundle/data/demo/qwen35-tiny --fresh
          (builds .llama/build-cpu first: ~15 min on 2 cores)

--fresh adds a fresh-init tiny checkpoint (tests/checkpoints.py, with equal GDN key and value head sizes: llama.cpp
takes no other). The build starts when llama-server is missing (CUDA sm_90 unless --cpu).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import llama_cpp  # noqa: E402
from benchmarks.bench_serve import free_port  # noqa: E402

FIGURES = ("precision", "precision_source", "worst", "mean", "bound", "mean_bound", "positions", "agreed",
           "forks_excused", "forks_clear", "template_matched", "template_checked", "generated", "unchecked",
           "left_out", "filled", "fill_refused", "random_prompts", "token_prompts", "top_logprobs", "failures")


def fresh_checkpoint(folder: Path) -> Path:
    from tests import checkpoints

    config = dict(checkpoints.TINY_CONFIGS["base"], linear_key_head_dim=checkpoints.BASE["linear_value_head_dim"])
    return checkpoints.make_qwen35_with_tokenizer(folder, **config)


def serve(folder: Path, gguf: Path, cpu: bool, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """llama-server on a free loopback port; returns once /health answers 200."""
    port = free_port()
    cmd = [str(llama_cpp.binary(folder, "llama-server", cpu)), "-m", str(gguf), "--port", str(port), "-np", "1",
           "-c", "4096", "--no-webui", "-a", gguf.stem, "-ngl", "0" if cpu else "99", *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return proc, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not answer /health in 300 s")


def gate(url: str, checkpoint: Path) -> dict:
    """`lmbundle gate --server URL --oracle CHECKPOINT --json`, in its own process (as a user runs it)."""
    proc = subprocess.run([sys.executable, "-m", "lmbundle", "gate", "--server", url, "--oracle", str(checkpoint),
                           "--json", "--quiet"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode not in (0, 1):
        return {"error": (proc.stderr or proc.stdout).strip()[-2000:], "exit": proc.returncode}
    report = json.loads(proc.stdout)
    return {"verdict": report["verdict"], "exit": proc.returncode, **{k: report[k] for k in FIGURES}}


def run(args) -> dict:
    folder = args.dir
    if not llama_cpp.built(folder, args.cpu, ["llama-server"]):
        log = Path(tempfile.gettempdir()) / "llama-build.log"
        print(f"building llama.cpp ({'CPU' if args.cpu else 'CUDA'}; log {log})", flush=True)
        build = llama_cpp.Background(folder, args.j, log, cpu=args.cpu, targets=["llama-server"])
        print(f"built in {build.wait():.0f} s", flush=True)
    results = {"llama_cpp": llama_cpp.VERSION, "cpu": args.cpu, "llama_server_args": args.llama_args, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoints = [Path(c) for c in args.checkpoint]
        if args.fresh:
            checkpoints.append(fresh_checkpoint(work / "fresh-tiny"))
        for checkpoint in checkpoints:
            for outtype in args.outtype:
                name = f"{checkpoint.name}-{outtype}"
                try:
                    gguf = llama_cpp.convert(folder, checkpoint, outtype, work / f"{name}.gguf", quiet=True)
                    proc, url = serve(folder, gguf, args.cpu, args.llama_args.split(), work / f"{name}.log")
                    try:
                        result = gate(url, checkpoint)
                    finally:
                        proc.terminate()
                        proc.wait(30)
                except Exception as exc:  # noqa: BLE001 - the peer's failure is a result
                    result = {"error": str(exc)[-2000:]}
                results["runs"][name] = result
                brief = {k: result.get(k) for k in ("verdict", "precision", "worst", "mean", "agreed", "positions",
                                                    "unchecked", "left_out", "filled", "error")
                         if result.get(k) is not None}
                print(f"{name}: {json.dumps(brief)}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="*", default=[str(REPO / "lmbundle/data/demo/qwen35-tiny")])
    parser.add_argument("--fresh", action="store_true", help="also a fresh-init tiny checkpoint")
    parser.add_argument("--outtype", nargs="+", default=["bf16", "q8_0"])
    parser.add_argument("--llama-args", default="",
                        help="more llama-server arguments, e.g. '-ctk f32 -ctv f32 -fa off'")
    parser.add_argument("--cpu", action="store_true", help="llama.cpp's CPU build (.llama/build-cpu)")
    parser.add_argument("--dir", type=Path, default=llama_cpp.DEFAULT_DIR)
    parser.add_argument("-j", type=int, default=os.cpu_count() or 4)
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    results = {"date": started.isoformat(timespec="seconds"),
               "command": " ".join(["python3", "benchmarks/llama_server_gate.py", *sys.argv[1:]]), **run(args)}
    folder = Path(args.results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{started:%Y%m%dT%H%M%SZ}-llama-server-gate.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
