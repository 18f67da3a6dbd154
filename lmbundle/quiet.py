"""The known-harmless messages of the libraries lmbundle drives, silenced here and nowhere else.

`lmbundle` (every command) and `make demo` call `quiet()` once at start unless `--verbose`; code that
imports lmbundle as a library sees everything. Each message below is matched by its text, so any
other warning, log line or runtime output still shows, and errors still end as one `error:` line.

- torch.utils._pytree (torch.export, in conversion): FutureWarning "`isinstance(treespec, LeafSpec)`
  is deprecated"; with older transformers "`torch.utils._pytree._register_pytree_node` is
  deprecated". A warnings filter.
- coreai-torch, on import: UserWarning "coreai-torch has only been validated with torch<=...".
  A warnings filter.
- transformers.integrations.hub_kernels (the oracle's Qwen3.5 GDN layers): "`causal_conv1d_fn` is
  falling back to its reference PyTorch implementation because `causal_conv1d` is not installed..."
  and the same for `flash-linear-attention`. A filter on that logger.
- transformers `from_pretrained` (the oracle): the "Loading weights" progress bar.
  `transformers_loading()` around the load (hub downloads keep their bars).
- coreai-torch's converter (a rich console on stdout): "coreai-torch 0.4.3: converting 1 program(s)
  to Core AI". `python_stdout_filtered()` around `to_coreai()` (convert/coreai_export.py,
  convert/vision_export.py).
- The Core AI runtime (native code, straight to file descriptor 2): "ODIE [default]: Loading function
  'main'". `native_stderr_filtered()` around `load_function` (engine/coreai_backend.py).

The last two are written by code that Python's filters never see, so the calls that emit them run
inside a context manager that captures the stream and writes back every line it does not know.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings

WARNINGS = (  # (category, message regex at the start of the warning text)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (FutureWarning, r"`torch\.utils\._pytree\._register_pytree_node` is deprecated"),
    (UserWarning, r"coreai-torch has only been validated with torch"),
)
TRANSFORMERS_LOG = re.compile(r"`\w+` is falling back to its reference PyTorch implementation because "
                              r"`(causal_conv1d|flash-linear-attention)` is not installed")
PYTHON_STDOUT = re.compile(r"^coreai-torch \S+: converting \d+ program\(s\) to Core AI\s*$")
NATIVE_STDERR = re.compile(r"^ODIE \[default\]: Loading function '\w+'\s*$")

_active = False


class _DropFallbackNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TRANSFORMERS_LOG.search(record.getMessage())


def quiet(verbose: bool = False) -> None:
    """Silence the messages listed above for the rest of the process (nothing when `verbose`)."""
    global _active
    if verbose or _active:
        return
    _active = True
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("transformers.integrations.hub_kernels").addFilter(_DropFallbackNotices())


@contextlib.contextmanager
def transformers_loading():
    """transformers' "Loading weights" bar off while the block loads a model (hub downloads keep theirs)."""
    if not _active:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def python_stdout_filtered(pattern: re.Pattern = PYTHON_STDOUT):
    """Python-level stdout captured for the block; every line but the known ones written back after."""
    if not _active:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        _write_back(buffer.getvalue(), pattern, sys.stdout)


@contextlib.contextmanager
def native_stderr_filtered(pattern: re.Pattern = NATIVE_STDERR):
    """File descriptor 2 captured for the block (native code writes there directly); every line but
    the known ones written back to stderr after it."""
    if not _active:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            _write_back(capture.read().decode("utf-8", "replace"), pattern, sys.stderr)


def _write_back(text: str, pattern: re.Pattern, stream) -> None:
    kept = [line for line in text.splitlines(keepends=True) if not pattern.search(line)]
    if kept:
        stream.write("".join(kept))
        stream.flush()
