"""lmbundle/quiet.py drops exactly the known-harmless messages and lets everything else through.

Each case runs in a fresh interpreter (quiet() changes process-wide filters): the known message is
emitted the way its library emits it (a warning, a transformers log record, a rich-console line on
Python's stdout, a native write to file descriptor 2), next to a message that must survive.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import logging, os, sys, warnings
from lmbundle import quiet as q
if sys.argv[1] == "quiet":
    q.quiet()
warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", FutureWarning)
warnings.warn("coreai-torch has only been validated with torch<=2.13.0; found torch 2.13.0+cpu.", UserWarning)
warnings.warn("some other future change", FutureWarning)
log = logging.getLogger("transformers.integrations.hub_kernels")
log.warning("`causal_conv1d_fn` is falling back to its reference PyTorch implementation because "
            "`causal_conv1d` is not installed. This is correct but much slower")
log.warning("a different transformers warning")
with q.python_stdout_filtered():
    print("coreai-torch 0.4.3: converting 1 program(s) to Core AI")
    print("converter says something else")
with q.native_stderr_filtered():
    os.write(2, b"ODIE [default]: Loading function 'main'\n")
    os.write(2, b"runtime: a real problem\n")
print("done")
"""


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_known_messages_only(mode):
    done = _run(mode)
    assert done.returncode == 0, done.stderr
    out, err = done.stdout, done.stderr
    for kept in ("some other future change", "a different transformers warning", "runtime: a real problem"):
        assert kept in err, (kept, err)
    assert "converter says something else" in out and out.rstrip().endswith("done")
    known_err = ("LeafSpec", "coreai-torch has only been validated", "falling back to its reference", "ODIE [default]")
    if mode == "quiet":
        assert not any(k in err for k in known_err), err
        assert "converting 1 program(s)" not in out
    else:  # --verbose: everything shows
        assert all(k in err for k in known_err), err
        assert "converting 1 program(s)" in out
