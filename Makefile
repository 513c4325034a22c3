PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint lint-ruff lint-format lint-lua format mypy test e2e run chaos bench all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,flower,examples]'
	touch $(STAMP)

install: $(STAMP)

lint: lint-ruff lint-format lint-lua

lint-ruff: $(STAMP)
	$(BIN)/ruff check .

lint-format: $(STAMP)
	$(BIN)/ruff format --check .

lint-lua:
	luacheck -q invoice_worker/lua

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

mypy: $(STAMP)
	$(BIN)/mypy

# Coverage here only: a targeted `pytest tests/test_x.py` stays quick.
test: lint mypy
	$(BIN)/pytest --cov=invoice_worker --cov-report=term-missing:skip-covered

# Every example shop's browser test (make test runs the Django one only).
e2e: $(STAMP)
	$(BIN)/pytest tests/examples -m 'e2e or not e2e'

run: $(STAMP)
	$(BIN)/invoice-worker dev --demo 20

# One Redis killed and restarted; Sentinel failovers (clean, then losing writes) with
# INVOICE_REDIS_MIN_REPLICAS=1 on the Redis broker and on RabbitMQ quorum queues; and the
# control, the same failovers with 0, which must break the promises.
chaos: $(STAMP)
	$(BIN)/python -m chaos.run --jobs 5000
	$(BIN)/python -m chaos.run --jobs 3000 --topology sentinel --min-replicas 1 --callback-time-scale 0.01
	$(BIN)/python -m chaos.run --jobs 3000 --topology sentinel --min-replicas 1 --broker quorum --callback-time-scale 0.01
	$(BIN)/python -m chaos.run --jobs 1000 --topology sentinel --min-replicas 0 --expect-broken --timeout 300

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

all: format test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
