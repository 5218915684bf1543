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

demo: setup
	$(BIN)/graphprune demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check graphprune passes backends tests benchmarks examples
	$(BIN)/ruff format --check graphprune passes backends tests benchmarks examples

.PHONY: setup demo test lint
