# The front door. `make run` and `make test` work on a fresh clone with nothing else installed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DS_BUILD_OPS := 0
export DS_ACCELERATOR := cpu
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run ablate test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-installs only when pyproject.toml changes; a second `make` call is instant.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main chain only (prepare -> validate -> pretrain -> evaluate); `make ablate` adds the ablations.
run: install
	$(BIN)/dvc repro evaluate
	$(BIN)/moon3 data stats data/prepared
	$(BIN)/moon3 summary

# Trains no_fusion, no_fire and no_reasoning (same data, steps, seed) and writes reports/ablations/eval.
ablate: install
	$(BIN)/dvc repro evaluate_ablations

test: install
	$(BIN)/pytest -q tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) data/prepared data/validated data/quarantine models reports dvclive
