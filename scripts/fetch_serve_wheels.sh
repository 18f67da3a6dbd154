#!/bin/sh
# Downloads the server's wheels (fastapi, uvicorn, prometheus-client, pillow and what they need, at requirements.txt's pins)
# for Python 3.12 on x86_64 Linux into .serve/wheels (ignored by git): the lent GPU machine has torch and
# transformers but not these, and no network. Carry `.serve` there and install before benchmarks/bench_serve.py:
#   pip install -q --no-index --find-links .serve/wheels fastapi uvicorn prometheus-client pillow
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
pins=$(grep -iE '^(pillow|fastapi|starlette|uvicorn|prometheus-client|pydantic|pydantic_core|annotated-types|annotated-doc|typing-inspection|typing_extensions|anyio|sniffio|idna|h11|click)==' requirements.txt)
# shellcheck disable=SC2086
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d .serve/wheels $pins
