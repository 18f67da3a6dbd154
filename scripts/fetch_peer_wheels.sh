#!/bin/sh
# Downloads the flash-linear-attention wheels (pure Python + Triton) for bench_decode.py's second transformers
# peer into .peer/wheels (ignored by git: carry `.peer` to the GPU machine, which has no network).
# causal-conv1d is left out: it ships only as a source tarball (a CUDA build), so transformers uses its torch conv.
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" -m pip download --no-deps --only-binary=:all: -d .peer/wheels flash-linear-attention==0.6.0 fla-core==0.6.0
