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

.PHONY: install run ablate test lint bench clean gate promote image

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

# CI-gated promotion (.github/workflows/promote.yml; MLflow from MLFLOW_TRACKING_URI). `gate`: reproduce, diff the
# metrics against BASE_REV, register the model as challenger and run the gate without moving champion; the tables
# land in reports/ for the pull request comment. `promote`: register and move champion if the gate passes.
MODEL ?= models/rl/final
BASE_REV ?= main
PIPELINE_RUN_ID ?= local

gate: install
	$(BIN)/dvc repro
	$(BIN)/dvc metrics diff $(BASE_REV) --md > reports/metrics_diff.md
	$(BIN)/moon3 register $(MODEL) --pipeline-run-id $(PIPELINE_RUN_ID)
	$(BIN)/moon3 promote --dry-run --table reports/gate.md

promote: install
	$(BIN)/dvc repro
	$(BIN)/moon3 register $(MODEL) --pipeline-run-id $(PIPELINE_RUN_ID)
	$(BIN)/moon3 promote --table reports/gate.md

# The CPU image of this tree, moon3:src-<source hash>, built offline by infra/docker/build_image.sh (base image and
# wheelhouse cached by content hash; an image with this tree's tag is reused). As root on Debian it installs
# docker.io/debootstrap and starts dockerd when none runs; `MOON3_IMAGE_FORCE=1 make image` rebuilds.
image: install
	PY=$(CURDIR)/$(BIN)/python bash infra/docker/build_image.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) data/prepared data/validated data/quarantine models reports dvclive
