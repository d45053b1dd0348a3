# paybus — see README.md. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test check lint typecheck migrate bench chaos services clean scale cluster-test

install: $(STAMP)

$(STAMP): pyproject.toml deploy/requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c deploy/requirements.lock -e '.[dev]'
	@touch $(STAMP)

services:
	@./deploy/dev/ensure-services.sh

migrate: install services
	$(BIN)/paybus migrate

run: install services
	$(BIN)/paybus dev

test: install services
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

# ≥10,000 events through private RabbitMQ and Postgres instances while they and the processor are
# killed and restarted (6-8 min on two busy shared cores). Not part of `make test`.
chaos: install services
	PAYBUS_CHAOS=1 $(BIN)/python -m pytest -q -s tests/chaos --timeout 900 $(PYTEST_ARGS)

bench: install services
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

# deployment proofs too long for `make test` (deploy/README.md "Scale-out")
scale: install services
	PAYBUS_SCALE_EVENTS=20000 $(BIN)/python -m pytest -q -s tests/e2e/test_scale_out.py $(PYTEST_ARGS)

cluster-test: install services
	PAYBUS_CLUSTER_TEST=1 $(BIN)/python -m pytest -q -s tests/e2e/test_scale_cluster.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
