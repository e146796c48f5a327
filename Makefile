# Every developer command; `make help` lists them. CI runs `make test` (see .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The lock files (`make lock` writes them from pyproject.toml): the exact versions CI tested.
RUNTIME_LOCK := requirements/runtime.txt
DEV_LOCK := requirements/dev.txt
# `make lock` runs pip-compile from a throwaway virtualenv; the project's own venv never gets it.
PIP_TOOLS := pip-tools==7.6.2
COMPILE := --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade)

.DEFAULT_GOAL := help
# `make flower`: where Flower listens, and where `make run` leaves its embedded Redis's URL.
FLOWER_PORT ?= 5555
FLOWER_ADDRESS ?= 127.0.0.1
DATA_DIR ?= var

.PHONY: help setup run flower test test-fast lint format bench lock audit clean

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): $(DEV_LOCK) $(RUNTIME_LOCK) pyproject.toml client/pyproject.toml
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
		(apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null; }
	@command -v chromium >/dev/null || { echo "installing chromium (the web console's browser tests)"; \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null; }
	@command -v faketime >/dev/null || { echo "installing faketime (test_partition: a worker host's clock off)"; \
		(apt-get update -qq && apt-get install -y -qq faketime) >/dev/null; }
# found as devstack's worker_env finds it (ctypes.util.find_library), which needs no ldconfig on PATH
	@$(PYTHON) -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('jemalloc'))" || { \
		echo "installing libjemalloc2 (the workers' allocator)"; \
		(apt-get update -qq && apt-get install -y -qq libjemalloc2) >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r $(DEV_LOCK)
	$(BIN)/pip install -q --no-deps -e .
# the SDK and the `imagegen` command (client/); its dependencies are in the dev lock (the `test` extra)
	$(BIN)/pip install -q --no-deps -e ./client
	@touch $(STAMP)

setup: $(STAMP) ## create the virtualenv and install the locked versions (done by run and test)

run: $(STAMP) ## run the whole service on embedded defaults (API on $$PORT, default 8000)
	$(BIN)/python -m devstack

# Flower reads the broker (REDIS_URL or REDIS_SENTINELS, else the embedded Redis of a running `make run`) and asks the workers
# for their state; it turns their task events on while it runs (README.md, "Flower"). FLOWER_BASIC_AUTH=user:pass
# protects it, and enables its HTTP API (/api/...).
flower: $(STAMP) ## Flower, Celery's dashboard, on $$FLOWER_ADDRESS:$$FLOWER_PORT (127.0.0.1:5555) against $$REDIS_URL
	@url="$${REDIS_URL:-$$(cat $(DATA_DIR)/redis_url 2>/dev/null)}"; \
	if [ -z "$$url$$REDIS_SENTINELS" ]; then echo "make flower: set REDIS_URL (or REDIS_SENTINELS), or start make run first" >&2; exit 2; fi; \
	echo "Flower on http://$(FLOWER_ADDRESS):$(FLOWER_PORT)"; \
	REDIS_URL="$$url" exec $(BIN)/celery -A worker.main flower --address=$(FLOWER_ADDRESS) --port=$(FLOWER_PORT)

test: lint ## the whole test suite: lint, types, bandit, unit, end-to-end and fault tests on real processes
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP) ## ruff check and format check, mypy (strict), bandit (security lint of what runs in production)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/bandit -q -c pyproject.toml -r services api worker

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## the benchmarks (see bench/README.md)
	$(BIN)/python -m bench

lock: ## rewrite requirements/*.txt from pyproject.toml, keeping their pins (UPGRADE=1: newest allowed)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp" && "$$tmp/bin/pip" install -q $(PIP_TOOLS) && \
	export CUSTOM_COMPILE_COMMAND="make lock  (UPGRADE=1: the newest versions that pyproject.toml allows)" && \
	"$$tmp/bin/pip-compile" $(COMPILE) -o $(RUNTIME_LOCK) pyproject.toml && \
	"$$tmp/bin/pip-compile" $(COMPILE) --extra dev --extra test -c $(RUNTIME_LOCK) -o $(DEV_LOCK) pyproject.toml

# Not part of `make test`: pip-audit asks a vulnerability service (PyPI's JSON API per version, or OSV) about
# every pinned package, and CI may reach only the package index (README.md, "Development"). --strict: a
# package it could not look up fails the audit instead of passing unchecked.
audit: $(STAMP) ## check the locked dependencies for known vulnerabilities (pip-audit; needs the network)
	$(BIN)/pip-audit --strict --no-deps --disable-pip --progress-spinner off -r $(RUNTIME_LOCK) -r $(DEV_LOCK)

clean: ## remove the virtualenv and local data
	rm -rf $(VENV) var
