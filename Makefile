# bativision: `make demo` and `make test` each install what they need first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install demo test ui lint sample clean bench-crop bench-infer

$(BIN)/python:
	@command -v $(PY) >/dev/null || { echo "$(PY) not found: install Python 3.11"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, by exact version: a range would pull the CUDA build from the registry.
$(STAMP): $(BIN)/python requirements.lock pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m orchestration.demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup

$(DAGSTER_HOME)/dagster.yaml: orchestration/instance/local.yaml
	mkdir -p $(DAGSTER_HOME) && cp $< $@

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Benchmarks need rio-tiler (the baseline) on top of the pinned runtime.
$(VENV)/.bench-installed: $(STAMP) requirements-bench.lock
	$(BIN)/pip install --quiet --no-deps -r requirements-bench.lock
	@touch $@

bench-crop: $(VENV)/.bench-installed
	$(BIN)/python -m bench.crop

bench-infer: install
	$(BIN)/python -m bench.infer

clean:
	rm -rf data .dagster_home dbt/target dbt/logs
