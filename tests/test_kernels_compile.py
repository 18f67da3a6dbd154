"""The Triton kernels compile for Hopper (sm_90: the H100 and H200) as the 2B's decode step, prompt chunks and
batched step launch them, within an SM's shared memory, on any machine: `tests/kernels_compile.py` compiles
every launch ahead of time with Triton's own compiler and ptxas, no GPU needed.

The interpreter tests (test_step_kernels.py, test_row_kernels.py) check what the kernels compute; only a real
compile catches what the interpreter lets through: types, and resources (a rows kernel once asked for 616 KB
of shared memory where an H200 SM has 227 KB, found only on the GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SHARED_MEMORY = 227 * 1024  # the most a block may take on sm_90
REPO = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_hopper_within_its_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "tests.kernels_compile"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "backend" in proc.stderr.lower()):
        pytest.skip(f"Triton cannot compile for sm_90 here: {proc.stderr.strip().splitlines()[-1][:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout)
    assert len(shared) >= 18, shared  # every launch of both steps was compiled
    too_big = {label: size for label, size in shared.items() if size > SHARED_MEMORY}
    assert not too_big, f"shared memory over {SHARED_MEMORY} bytes: {too_big}"
