# Two commands for a fresh machine:  `make demo` (the main job) and `make test` (the suite).
# Each creates .venv on first use: the pinned CPU torch first, then the project with its extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/graphprune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

setup: $(BIN)/graphprune

# The real-zoo tier lives in its own venv (.venv-zoo) so `make test` stays light: torch 2.14.1
# with torchvision 0.29.1 (a second torch version, as users have), timm, ultralytics and
# Torch-Pruning, and graphprune itself editable (the package-dir mapping works with -e).
ZOO_VENV := .venv-zoo
ZOO_BIN := $(ZOO_VENV)/bin

$(ZOO_BIN)/zoo-ready: pyproject.toml
	$(PY) -m venv $(ZOO_VENV)
	$(ZOO_BIN)/pip install -q --upgrade pip
	$(ZOO_BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(ZOO_BIN)/pip install -q timm ultralytics 'torch-pruning>=1.6' pytest
	$(ZOO_BIN)/pip install -q -e .
	touch $@

zoo-setup: $(ZOO_BIN)/zoo-ready

# The CI list (one or two models per family); ZOO=full: every torchvision classifier that fits,
# 100 timm architectures, YOLOv8n and segmentation nets. Writes COVERAGE.md and
# benchmarks/results/zoo_coverage.json (see tests_zoo/).
ZOO ?= ci
test-zoo: zoo-setup
	GRAPHPRUNE_ZOO=$(ZOO) YOLO_OFFLINE=1 $(ZOO_BIN)/python -m pytest -q -p no:cacheprovider tests_zoo

demo: setup
	$(BIN)/graphprune demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check graphprune passes backends tests tests_zoo benchmarks examples
	$(BIN)/ruff format --check graphprune passes backends tests tests_zoo benchmarks examples

.PHONY: setup demo test lint zoo-setup test-zoo
