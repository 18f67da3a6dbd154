"""Apple's Core AI packages, imported in one place, and the compile cache that exporter and backend share.

The Linux runtime loads a compiled program (ODIX), not the bytecode, so the first load compiles and
keeps the result in a content-keyed cache (`$LMBUNDLE_CACHE/coreai/` or `~/.cache/lmbundle/coreai/`).
The key is the bytecode's sha256 as the asset records it (`main.hash`, checked against the bytecode
before compiling) plus the coreai-core version; an entry is built in a temporary folder and renamed
into place, and an entry whose files do not match its manifest (sizes + CRC32) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
import warnings
import zlib
from pathlib import Path

from ..errors import LmbundleError

COMPILED_FILE = "main-universal.odix"
MANIFEST = "manifest.json"


def import_coreai_torch():
    """coreai_torch, its torch.ops.coreai.* registered, without its torch-version warning."""
    try:
        with warnings.catch_warnings():  # "only validated with torch<=2.13.0; found 2.13.0+cpu"
            warnings.filterwarnings("ignore", message="coreai-torch has only been validated")
            import coreai_torch
        import coreai_torch._compression.custom_layers  # noqa: F401  (registers torch.ops.coreai.*)
    except ImportError as exc:
        raise LmbundleError("Core AI export needs coreai-torch: pip install 'lmbundle[coreai]'") from exc
    return coreai_torch


def cache_root() -> Path:
    base = os.environ.get("LMBUNDLE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "lmbundle") / "coreai"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def import_runtime():
    """(coreai-core version, coreai.runtime)."""
    try:
        import coreai.runtime
        from coreai._version import __version__
    except ImportError as exc:
        raise LmbundleError("the Core AI backend needs coreai-core: pip install 'lmbundle[coreai]'") from exc
    return __version__, coreai.runtime


def asset_digest(aimodel: Path) -> str:
    """The sha256 an asset records for its bytecode (`main.hash`, written by coreai-core's save_asset)."""
    digest = aimodel / "main.hash"
    if not (aimodel / "metadata.json").is_file() or not (aimodel / "main.mlirb").is_file() or not digest.is_file():
        raise LmbundleError(f"{aimodel}: not a Core AI asset (needs metadata.json, main.mlirb, main.hash)")
    return digest.read_bytes().hex()


def check_bytecode(aimodel: Path, digest: str) -> None:
    if _sha256(aimodel / "main.mlirb") != digest:
        raise LmbundleError(f"{aimodel}: main.mlirb does not match main.hash (damaged or partly copied)")


def _crc32(path: Path) -> int:
    """A whole-file checksum for cache entries: catches truncation and damaged bytes at ~1 GB/s
    (sha256 runs at a third of that here, and an entry is never untrusted input)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _entry_is_complete(entry: Path) -> bool:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        return bool(manifest["files"]) and all(
            (entry / name).stat().st_size == meta["size"] and _crc32(entry / name) == meta["crc32"]
            for name, meta in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def discard_entry(entry: Path) -> None:
    """Move a bad entry out of the way first (a rename is atomic), then delete it."""
    trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex}")
    try:
        entry.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def compile_asset(aimodel: Path, out_dir: Path) -> None:
    """Lower the asset's bytecode to ODIX (`main-universal.odix`) in out_dir, in a child process:
    the compiler aborts the whole process on some malformed bytecode, and its peak memory goes with it.

    coreai-core 1.0.0b3 has no public call that keeps the compiled program (`executable()` compiles to a
    temporary folder each time); `AIModelAsset._write_odix` is the one private call we rely on.
    """
    script = "import sys, pathlib; from coreai.authoring.asset import AIModelAsset as A; " \
        "A.load(sys.argv[1])._write_odix(pathlib.Path(sys.argv[2]))"
    done = subprocess.run([sys.executable, "-c", script, str(aimodel), str(out_dir)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.split("error:", 1)[1] for line in done.stderr.splitlines() if "error:" in line]
        reason = "; ".join(line.strip() for line in lines) or f"exit status {done.returncode}"
        raise LmbundleError(f"{aimodel}: Core AI could not compile it ({reason})")


def compiled_entry(aimodel: Path, root: Path | None = None) -> tuple[Path, bool]:
    """The cache folder holding the compiled program of `aimodel`, built if needed; (path, was_cached)."""
    version, _ = import_runtime()
    sha = asset_digest(aimodel)
    key = hashlib.sha256(f"{sha}:{version}".encode()).hexdigest()[:32]
    root = root or cache_root()
    entry = root / f"{key}.aimodelx"
    if _entry_is_complete(entry):
        return entry, True
    if entry.exists():
        discard_entry(entry)
    root.mkdir(parents=True, exist_ok=True)
    check_bytecode(aimodel, sha)  # only on a miss: a hit runs what was compiled from the verified bytes
    building = root / f".tmp-{key}-{uuid.uuid4().hex}.aimodelx"
    building.mkdir()
    try:
        compile_asset(aimodel, building)
        files = {p.name: {"size": p.stat().st_size, "crc32": _crc32(p)} for p in building.iterdir()}
        manifest = {"source_sha256": sha, "coreai_core": version, "files": files}
        (building / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            building.rename(entry)
        except OSError:  # another process finished the same entry first
            if not _entry_is_complete(entry):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return entry, False
