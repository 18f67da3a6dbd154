#!/bin/sh
# Downloads the server's wheels (fastapi, uvicorn, prometheus-client, pillow, and openai for `gate --server`, with
# everything they need, at requirements.txt's pins) for Python 3.12 on x86_64 Linux into .serve/wheels (ignored by
# git), and py-spy for `bench_serve.py --py-spy`: the lent GPU machine has torch and transformers but not these, and
# no network. Carry `.serve` there and install before benchmarks/bench_serve.py (its bare `pip` is another Python's):
#   python3 -m pip install -q --no-index --find-links .serve/wheels fastapi uvicorn prometheus-client pillow py-spy
# and before benchmarks/llama_server_gate.py:
#   python3 -m pip install -q --no-index --find-links .serve/wheels openai
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -c requirements.txt -d .serve/wheels fastapi uvicorn prometheus-client pillow py-spy openai
