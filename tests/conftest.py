"""Shared fixtures: tiny random checkpoints built with transformers' own classes and save_pretrained, the
demo model's bundles, and `lmbundle serve` run as a process with plain HTTP to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest
import torch

from tests import checkpoints

if not torch.cuda.is_available():  # the CUDA kernels' tests run in Triton's interpreter (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_device() -> str | None:
    """Where the Triton kernels' tests run: "cuda", else "cpu" in Triton's interpreter, else None (they skip)."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def kernel_tests_need(device: str | None) -> pytest.MarkDecorator:
    """The module mark of the kernels' tests: skip without a device for them, else need Triton."""
    if device is not None:
        pytest.importorskip("triton")
    return pytest.mark.skipif(device is None, reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_qwen35(tmp_path_factory):
    """The default tiny Qwen3.5 text checkpoint (3 GDN + 1 attention layer, untied head)."""
    return checkpoints.make_qwen35_with_tokenizer(
        tmp_path_factory.mktemp("ckpt") / "qwen35", **checkpoints.TINY_CONFIGS["base"]
    )


REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """A tiny Qwen3.5-with-vision checkpoint (its tokenizer and image processor too)."""
    folder = tmp_path_factory.mktemp("ckpt") / "qwen35-vlm"
    checkpoints.make_vlm("qwen3_5", folder)
    return folder


DEMO_QWEN35 = REPO / "lmbundle" / "data" / "demo" / "qwen35-tiny"


@pytest.fixture(scope="session")
def demo_bundles(tmp_path_factory):
    """The trained demo model (real margins) as fp16 and int8hu bundles, with .aimodel where Core AI installs."""
    from lmbundle.convert.convert import convert

    root = tmp_path_factory.mktemp("demo")
    return {q: convert(str(DEMO_QWEN35), root / q, quant=q, backend="all", log=None) for q in ("fp16", "int8hu")}


HOST_SHAPES = ("base", "deep_pattern", "qwen3_vl", "qwen3_5_vision")  # text x2 (GDN layouts), image-text x2


@pytest.fixture(scope="session")
def host_bundles(tmp_path_factory):
    """Fresh int8hu bundles with both backends (Core AI where it installs), one per shape the hosts must
    take: two tiny Qwen3.5 text layouts, a tiny Qwen3-VL (DeepStack) and a tiny Qwen3.5 with a vision
    tower. Converted once for the session (each export is ~10 s on the reference runtime)."""
    from lmbundle.convert.convert import convert

    root = tmp_path_factory.mktemp("host-bundles")
    bundles = {}
    for shape in HOST_SHAPES:
        ckpt = root / f"{shape}-ckpt"
        if shape in checkpoints.TINY_CONFIGS:
            checkpoints.make_qwen35_with_tokenizer(ckpt, **checkpoints.TINY_CONFIGS[shape])
        else:
            checkpoints.make_vlm(shape.removesuffix("_vision"), ckpt)
        bundles[shape] = convert(str(ckpt), root / shape, quant="int8hu", backend="all", max_context=256, log=None)
    return bundles


# Fresh-init checkpoints (exactly as transformers initialises them: uniform norms, dt_bias = ones, zero
# biases) of several shapes, tied and untied, text and VLM, each with the quant mode its bundle is made in.
FRESH = {
    "text-untied": (lambda folder: checkpoints.make_qwen35_with_tokenizer(
        folder, fresh=True, **checkpoints.TINY_CONFIGS["base"]), "int8hu"),
    "text-tied": (lambda folder: checkpoints.make_qwen35_with_tokenizer(
        folder, fresh=True, **checkpoints.TINY_CONFIGS["tied_mha"]), "fp16"),
    "vlm": (lambda folder: checkpoints.make_qwen3vl_with_tokenizer(folder, fresh=True), "int8hu"),
}


class FreshBundles:
    """name -> (checkpoint folder, bundle with both graphs, oracle), made on first use (a test worker
    builds only the ones its tests ask for)."""

    def __init__(self, root: Path):
        self.root, self._made = root, {}

    def __getitem__(self, name: str):
        if name not in self._made:
            from lmbundle.convert.convert import convert
            from lmbundle.gates.oracle import Oracle

            make, quant = FRESH[name]
            checkpoint = make(self.root / f"{name}-checkpoint")
            bundle = convert(str(checkpoint), self.root / name, quant=quant, backend="all", max_context=512, log=None)
            self._made[name] = (checkpoint, bundle, Oracle(str(checkpoint)))
        return self._made[name]


@pytest.fixture(scope="session")
def fresh_bundles(tmp_path_factory):
    return FreshBundles(tmp_path_factory.mktemp("fresh"))


@pytest.fixture(scope="session")
def sabotage_models(tiny_qwen35, tmp_path_factory):
    """The tiny random checkpoint and the trained demo model, each with its bundles made on first use."""
    from tests.sabotage import Model

    root = tmp_path_factory.mktemp("sabotage")
    (root / "tiny").mkdir()
    (root / "demo").mkdir()
    return {"tiny": Model(tiny_qwen35, root / "tiny"), "demo": Model(DEMO_QWEN35, root / "demo")}


# -- `lmbundle serve` as a process -------------------------------------------------------------------------
API_KEY = "test-key"  # what the tests' servers take where they take a key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(method: str, host: str, path: str, body: bytes | dict | None = None, key: str | None = API_KEY,
         timeout: float = 60, **extra_headers: str) -> tuple[int, dict | str]:
    """One plain HTTP request (for what the openai client cannot send: bad JSON, no key); the JSON answer
    decoded where it is JSON. Header names: underscores for dashes."""
    conn = HTTPConnection(host, timeout=timeout)
    headers = {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in extra_headers.items()}}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read().decode()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except json.JSONDecodeError:
        return response.status, raw


def wait_idle(host: str, seconds: float = 5) -> dict:
    """/health once the worker is idle (it marks itself idle just after the answer's last event)."""
    deadline = time.monotonic() + seconds
    while (health := http_request("GET", host, "/health")[1])["running"] or health["waiting"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return health


@pytest.fixture(scope="module")
def engine(bundle):
    """The module's `bundle` on PyTorch on the CPU, in this process: the reference a server's answers are
    compared with."""
    from lmbundle.engine.engine import Engine

    return Engine(bundle, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def client(server):
    """The official openai client of the module's `server` (process, host)."""
    import openai

    return openai.OpenAI(base_url=f"http://{server[1]}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def serve():
    """`serve(bundle, *options)`: `python -m lmbundle serve` on a free loopback port (PyTorch on the CPU),
    returned as (process, host) once /health answers; every server a module started stops when its tests end.
    `open_files`: the process's open-file limit (soft and hard), as `ulimit -n` would set it."""
    started = []

    def start(bundle, *extra: str, timeout: float = 90, open_files: int | None = None) -> tuple[subprocess.Popen, str]:
        import resource

        port = free_port()
        limit = None if open_files is None else (
            lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files)))
        proc = subprocess.Popen([sys.executable, "-m", "lmbundle", "serve", str(bundle), "--port", str(port),
                                 "--backend", "torch", "--device", "cpu", *extra],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=limit)
        started.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if http_request("GET", f"127.0.0.1:{port}", "/health")[0] == 200:
                    return proc, f"127.0.0.1:{port}"
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not answer /health in time")

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
