# bativision: `make demo` and `make test` each install what they need first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install install-emulators install-browser install-mapserver demo test ui recover lint sample clean bench-crop bench-infer bench-cuda bench-prefetch bench-convert bench-pods capacity

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

# The BigQuery emulator (tests only) needs Python >= 3.13: its own virtualenv, exact pins, no
# resolution (its metadata asks for duckdb>=2; it runs offline on 1.5.5 with the wheels' extensions).
BQ_PY ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.1[3-5]*/bin/python) $(shell command -v python3.13 2>/dev/null))
BQ_VENV := .venv-bq
BQ_STAMP := $(BQ_VENV)/.installed

$(BQ_STAMP): requirements-bigquery-emulator.lock tests/standins/install_duckdb_extensions.py
	@test -n "$(BQ_PY)" && test -x "$(BQ_PY)" || { echo "$(BQ_PY) not found: the BigQuery emulator needs Python >= 3.13 (set BQ_PY)"; exit 1; }
	rm -rf $(BQ_VENV)
	$(BQ_PY) -m venv $(BQ_VENV)
	$(BQ_VENV)/bin/pip install --quiet --upgrade pip
	$(BQ_VENV)/bin/pip install --quiet --no-deps -r requirements-bigquery-emulator.lock
	$(BQ_VENV)/bin/python tests/standins/install_duckdb_extensions.py
	@touch $(BQ_STAMP)

install-emulators: $(BQ_STAMP)

# The UI test drives Debian's Chromium through its ChromeDriver (nothing downloads a browser at run
# time): installed from the distribution's packages when missing (as root, or through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
install-browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "install chromium and chromedriver (Debian: chromium chromium-driver)"; exit 1; }; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver; }

# The WMS/WMTS tests serve a synthetic département with Debian's MapServer and MapCache (OGC reference servers).
install-mapserver:
	@command -v mapserv >/dev/null && test -x /usr/lib/cgi-bin/mapcache || { \
	  command -v apt-get >/dev/null || { echo "install MapServer and MapCache's CGI programs (Debian: cgi-mapserver mapcache-cgi)"; exit 1; }; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends cgi-mapserver mapcache-cgi; }

demo: install
	$(BIN)/python -m orchestration.demo

test: install install-emulators install-browser install-mapserver
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup

$(DAGSTER_HOME)/dagster.yaml: orchestration/instance/local.yaml
	mkdir -p $(DAGSTER_HOME) && cp $< $@

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# A run killed mid-step (kill -9, OOM) stays STARTED and holds its pool slot: mark it failed, free the slot.
# (`make ui`'s daemon does it by itself; `make demo` does it at its start.)
recover: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m orchestration.recovery

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Benchmarks need rio-tiler (the baseline) on top of the pinned runtime.
$(VENV)/.bench-installed: $(STAMP) requirements-bench.lock
	$(BIN)/pip install --quiet --no-deps -r requirements-bench.lock
	@touch $@

bench-crop: $(VENV)/.bench-installed
	$(BIN)/python -m bench.crop $(BENCH_ARGS)

bench-prefetch: install install-mapserver
	$(BIN)/python -m bench.prefetch
	$(BIN)/python -m bench.prefetch --source wms --buildings 2000

# JP2 decoded every month or converted once to COGs: the break-even (README, "Benchmarks")
bench-convert: install
	$(BIN)/python -m bench.convert

bench-infer: install
	$(BIN)/python -m bench.infer

# the step's compute on a GPU machine (runs on CPU too): it needs torch, rasterio, shapely and pyproj, not Dagster
bench-cuda: install
	$(BIN)/python -m bench.cuda

# memory and scratch of each step, measured: the figures orchestration/pods.py sizes the step pods from
bench-pods: install
	$(BIN)/python -m bench.pods

# what enriching France takes on a GKE node pool (k8s/README.md, "Capacity plan")
capacity: install
	$(BIN)/python -m orchestration.capacity --france --estimate-only

clean:
	rm -rf data .dagster_home dbt/target dbt/logs $(BQ_VENV)
