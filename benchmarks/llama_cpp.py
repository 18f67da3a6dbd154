"""llama.cpp (CUDA) beside lmbundle on the same checkpoint: fetch its source here, build and bench on the GPU machine.

The GPU machine has no network, and llama.cpp's git repository is too large to fetch, so the source comes from
PyPI's llama-cpp-python source archive, which vendors a llama.cpp that supports `qwen35` (0.3.36: ggml 0.25.3):

  python benchmarks/llama_cpp.py fetch            # here: pip download the sdist, prune it into .llama/ (~26 MB)
  python benchmarks/llama_cpp.py build            # there: cmake + llama-bench, llama-server, llama-quantize
                                                  # (--target: some), CUDA sm_90 in .llama/build (--cpu: the CPU
                                                  # backend only, in .llama/build-cpu)
  python benchmarks/llama_cpp.py bench --checkpoint CKPT --outtype q8_0 bf16   # there: convert + llama-bench

benchmarks/llama_server_gate.py serves the same GGUFs with llama-server and gates them (`lmbundle gate --server`).

`.llama/` is ignored by git: name it in the device tool's `carry`. bench_decode.py --llama-cpp .llama starts the
build in the background (nice'd, while our own benches run), then converts its checkpoint and runs llama-bench
beside ours in the same call, with `-p P -n G -r 3 -ngl 99 -fa 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".llama"
# what the CUDA builds of llama-bench, llama-server and llama-quantize and the HF -> GGUF converter need from the
# vendored tree (llama-server: its multimodal library and an empty web UI table; no UI assets are fetched)
KEEP = ["CMakeLists.txt", "LICENSE", "cmake", "ggml", "src", "include", "common", "vendor", "gguf-py", "conversion",
        "convert_hf_to_gguf.py", "tools/llama-bench", "tools/server", "tools/mtmd", "tools/quantize",
        "tools/ui/CMakeLists.txt", "tools/ui/ui.cpp.in", "tools/ui/ui.h.in", "scripts/ui-assets.cmake"]
KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda"}
TOOLS = ["llama-bench", "mtmd", "quantize", "ui", "server"]
TARGETS = ["llama-bench", "llama-server", "llama-quantize"]
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_SERVER=ON",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON"]
CUDA_FLAGS = ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"]


def fetch(dest: Path) -> None:
    """pip download the sdist (no build, no deps), keep the vendored llama.cpp's parts in `KEEP`."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                        f"llama-cpp-python=={VERSION}"], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        if dest.exists():
            shutil.rmtree(dest)
        source = dest / "src"
        for name in KEEP:
            target = source / name
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, target)
        for backend in (source / "ggml" / "src").iterdir():
            if backend.is_dir() and backend.name.startswith("ggml-") and backend.name not in KEEP_BACKENDS:
                shutil.rmtree(backend)
        # the tools folder builds only what TARGETS need
        (source / "tools" / "CMakeLists.txt").write_text(
            "find_package(Threads REQUIRED)\nllama_add_compile_flags()\n"
            + "".join(f"add_subdirectory({tool})\n" for tool in TOOLS))
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"llama.cpp from llama-cpp-python {VERSION} in {dest}: {size / 1e6:.1f} MB")


def build(folder: Path, jobs: int, cpu: bool = False, targets: list[str] = TARGETS) -> Path:
    """Configure and build `targets` in folder/build (CUDA, sm_90), or in folder/build-cpu with the CPU backend
    only (`cpu`); returns the first. folder/build.lock exists while it runs (another process waits on it:
    `Background`), and says "failed" if it failed."""
    source, out, lock = folder / "src", build_dir(folder, cpu), folder / "build.lock"
    lock.write_text("building")
    try:
        subprocess.run(["cmake", "-S", str(source), "-B", str(out), "-G", "Ninja" if shutil.which("ninja") else
                        "Unix Makefiles", *CMAKE_FLAGS, *([] if cpu else CUDA_FLAGS)], check=True)
        subprocess.run(["cmake", "--build", str(out), "--target", *targets, "-j", str(jobs)], check=True)
    except BaseException:
        lock.write_text("failed")
        raise
    lock.unlink()
    return binary(folder, targets[0], cpu)


def build_dir(folder: Path, cpu: bool = False) -> Path:
    return folder / ("build-cpu" if cpu else "build")


def binary(folder: Path, name: str = "llama-bench", cpu: bool = False) -> Path:
    return build_dir(folder, cpu) / "bin" / name


CONVERT_WRAPPER = """
import sys
sys.argv = [sys.argv[0], *sys.argv[1:]]
sys.path.insert(0, {source!r})
sys.path.insert(1, {gguf!r})
import conversion.base as base
# a home-made tokenizer's pre-tokenizer hash is unknown to the converter: it is Qwen's byte-level BPE
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def convert(folder: Path, checkpoint: Path, outtype: str, out: Path, quiet: bool = False) -> Path:
    """HF checkpoint -> GGUF of `outtype` (q8_0, bf16, f16) with llama.cpp's own converter (no MTP weights);
    `quiet`: its log only when it fails."""
    source = folder / "src"
    wrapper = out.with_suffix(".convert.py")
    wrapper.write_text(CONVERT_WRAPPER.format(source=str(source), gguf=str(source / "gguf-py"),
                                              script=str(source / "convert_hf_to_gguf.py")))
    proc = subprocess.run([sys.executable, str(wrapper), str(checkpoint), "--outtype", outtype, "--outfile", str(out),
                           "--no-mtp"], capture_output=quiet, text=True)
    if proc.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({proc.returncode}): {(proc.stderr or '')[-2000:]}")
    return out


def run_bench(folder: Path, gguf: Path, p: int, g: int, reps: int = 3) -> dict:
    """llama-bench -p P -n G -r reps -ngl 99 -fa 1, JSON out: {prompt_tok_s, decode_tok_s, raw}."""
    cmd = [str(binary(folder)), "-m", str(gguf), "-p", str(p), "-n", str(g), "-r", str(reps), "-ngl", "99",
           "-fa", "1", "-o", "json"]
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    rows = json.loads(proc.stdout)
    result = {"command": " ".join(cmd[1:]).replace(str(gguf), gguf.name), "raw": rows}
    for row in rows:
        key = "prompt_tok_s" if row.get("n_prompt", 0) > 0 else "decode_tok_s"
        result[key] = round(row["avg_ts"], 1)
        result[key.replace("_tok_s", "_stddev")] = round(row.get("stddev_ts", 0.0), 1)
        result.setdefault("build", f"{row.get('build_commit')} ({row.get('build_number')})")
        result.setdefault("gpu", row.get("gpu_info"))
    return result


def built(folder: Path, cpu: bool = False, targets: list[str] = TARGETS) -> bool:
    return all(binary(folder, target, cpu).exists() for target in targets)


class Background:
    """The build started at once in a nice'd background process (it overlaps our own benches)."""

    def __init__(self, folder: Path, jobs: int, log: Path, cpu: bool = False, targets: list[str] = ("llama-bench",)):
        self.folder, self.log, self.proc, self.cpu, self.targets = folder, log, None, cpu, list(targets)
        self.started = time.perf_counter()
        if built(folder, cpu, self.targets) or (folder / "build.lock").exists():
            return  # built, or being built by a process started before this one (it holds the lock)
        self.proc = subprocess.Popen(
            ["nice", "-n", "19", sys.executable, __file__, "build", "--dir", str(folder), "-j", str(jobs),
             "--target", *self.targets, *(["--cpu"] if cpu else [])], stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait(self) -> float:
        """Seconds from this object's start until the binary is there (raises if the build failed)."""
        if self.proc is not None and self.proc.wait() != 0:
            raise RuntimeError(f"llama.cpp build failed:\n{self.log.read_text()[-3000:]}")
        lock = self.folder / "build.lock"
        while lock.exists() and lock.read_text() != "failed":
            time.sleep(2)
        if not built(self.folder, self.cpu, self.targets):
            raise RuntimeError(f"llama.cpp build failed (see {self.log})")
        return time.perf_counter() - self.started


def side_by_side(folder: Path, checkpoint: Path, outtypes: list[str], p: int, g: int, work: Path) -> dict:
    """Convert and bench each outtype; errors are recorded, not raised (ours still gets reported)."""
    results = {}
    for outtype in outtypes:
        try:
            gguf = convert(folder, checkpoint, outtype, work / f"model-{outtype}.gguf")
            results[outtype] = run_bench(folder, gguf, p, g)
            gguf.unlink()
        except Exception as exc:  # noqa: BLE001 - the peer's failure is a result
            results[outtype] = {"error": str(exc)[-2000:]}
        print(f"llama.cpp {outtype}: {json.dumps({k: v for k, v in results[outtype].items() if k != 'raw'})}",
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["fetch", "build", "bench"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("-j", type=int, default=os.cpu_count() or 4)
    parser.add_argument("--cpu", action="store_true", help="build: the CPU backend only, in DIR/build-cpu")
    parser.add_argument("--target", nargs="+", default=TARGETS, choices=TARGETS, help="build: these only")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--outtype", nargs="+", default=["q8_0", "bf16"])
    parser.add_argument("-p", type=int, default=128)
    parser.add_argument("-g", type=int, default=256)
    args = parser.parse_args()
    if args.what == "fetch":
        fetch(args.dir)
    elif args.what == "build":
        print(build(args.dir, args.j, cpu=args.cpu, targets=args.target))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(side_by_side(args.dir, args.checkpoint, args.outtype, args.p, args.g, Path(tmp))))


if __name__ == "__main__":
    main()
