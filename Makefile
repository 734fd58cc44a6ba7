# reconciliation_pipeline developer entry points (GNU make).  All targets are idempotent.
#
#   make services   start PostgreSQL (pgserver) + MongoDB (nx-27017); env in .devservices/env.sh
#   make tables     alembic upgrade + application tables
#   make test       run the test suite against the services    (PYTEST_ARGS="-k foo -x")
#   make demo       run the end-to-end demo
#   make ui         dagster dev on http://127.0.0.1:3000 (webserver + daemon, schedules run)
#   make bench      load benchmark                               (BENCH_ARGS="...")
#   make bench-shards  1 vs 2 compare shards through Dagster      (after make bench)
#   make down       stop the services (data is kept)     make clean   down --purge + remove .venv
#   make chromium   install chromium + chromium-driver via apt (root only)
#
# Use the services from your shell:  source .devservices/env.sh

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.ONESHELL:

PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
VENV = .venv
VPY = $(VENV)/bin/python
STAMP = $(VENV)/.installed
# State dir of the dev services: $RECON_DEVSERVICES_DIR or ./.devservices (exported, so every
# devservices call below uses the same one).
DEVSERVICES_DIR := $(abspath $(or $(RECON_DEVSERVICES_DIR),.devservices))
export RECON_DEVSERVICES_DIR := $(DEVSERVICES_DIR)
ENV_FILE = $(DEVSERVICES_DIR)/env.sh
DEVSERVICES = $(VPY) -m reconciliation_pipeline.devservices
PYTEST_ARGS ?=
BENCH_ARGS ?=
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000

# Source the env file written by `make services` (recipes run in one bash each, see .ONESHELL).
WITH_ENV = source "$(ENV_FILE)"

.PHONY: help venv services tables test demo ui bench bench-shards down clean chromium chromium-check

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed -e 's/^# \{0,1\}//'

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Re-install when pyproject.toml (or setup.py) is newer than the stamp.
$(STAMP): pyproject.toml setup.py | $(VPY)
	$(VPY) -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

services: venv
	mkdir -p "$(DEVSERVICES_DIR)"
	$(DEVSERVICES) up > "$(ENV_FILE).tmp"
	mv -f "$(ENV_FILE).tmp" "$(ENV_FILE)"
	echo "services up; environment: source $(ENV_FILE)" >&2

tables: services
	$(WITH_ENV)
	$(VPY) -m reconciliation_pipeline.db create-app-tables
	$(VPY) -m reconciliation_pipeline.db upgrade

# Optional for local runs: browser tests skip themselves without chromium.  .ci/run installs it.
chromium-check:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
	  echo "chromium: $$(command -v chromium || command -v chromium-browser)" >&2
	else
	  echo "chromium: not installed (browser tests will be skipped; 'make chromium' installs it)" >&2
	fi

test: venv services chromium-check
	@$(WITH_ENV)
	echo "+ $(VPY) -m pytest -q reconciliation_pipeline_tests $(PYTEST_ARGS)"
	$(VPY) -m pytest -q reconciliation_pipeline_tests $(PYTEST_ARGS)

# 24 hours of drift reconciled by real runs in DAGSTER_HOME (their log: $$DAGSTER_HOME/demo-runs.log),
# a line per hour, then the latest report; `make ui` shows the plots.
demo: venv services tables
	@$(WITH_ENV)
	$(VPY) -m reconciliation_pipeline.demo

ui: services tables
	$(WITH_ENV)
	exec $(VENV)/bin/dagster dev -h $(UI_HOST) -p $(UI_PORT) -w workspace.yaml

bench: services
	$(WITH_ENV)
	$(VPY) -m benchmarks.bench $(BENCH_ARGS)

bench-shards: services
	$(WITH_ENV)
	$(VPY) -m benchmarks.bench_shards $(BENCH_ARGS)

down:
	if [ -x "$(VPY)" ]; then $(DEVSERVICES) down; else echo "no $(VENV); nothing to stop" >&2; fi

clean:
	if [ -x "$(VPY)" ]; then $(DEVSERVICES) down --purge; else rm -rf "$(DEVSERVICES_DIR)"; fi
	rm -rf $(VENV)

chromium:
	if command -v chromium >/dev/null 2>&1; then
	  echo "chromium already installed: $$(command -v chromium)"
	elif [ "$$(id -u)" = 0 ]; then
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
	else
	  echo "chromium is not installed; install it with:"
	  echo "  sudo apt-get update && sudo apt-get install -y chromium chromium-driver"
	fi
