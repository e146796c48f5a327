# Every developer command; `make help` lists them. CI runs `make test` (see .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast lint format bench clean

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
		(apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP) ## create the virtualenv and install everything (done by run and test)

run: $(STAMP) ## run the whole service on embedded defaults (API on $$PORT, default 8000)
	$(BIN)/python -m devstack

test: $(STAMP) ## the whole test suite: lint, types, unit, end-to-end and fault tests on real processes
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP) ## ruff check and format check, mypy (strict)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## the benchmarks (see bench/README.md)
	$(BIN)/python -m bench

clean: ## remove the virtualenv and local data
	rm -rf $(VENV) var
