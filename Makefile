# Two set-up commands: `make demo` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m lmbundle.demo

# The browser test drives Debian's chromium (Playwright never downloads a browser here); without it,
# that test skips with the reason. Two test processes (pytest-xdist): on CI's two cores the suite takes
# ~11 minutes instead of ~17 (the Core AI reference runtime is single-threaded). TEST_JOBS=0: one process.
TEST_JOBS ?= 2
test: $(VENV)/.installed
	-command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(PY) -m pytest -q -ra -n $(TEST_JOBS)
