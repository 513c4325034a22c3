PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# npm writes this copy of the lock file on every install.
NODE_STAMP := tests/node/node_modules/.package-lock.json

.PHONY: install lint lint-ruff lint-format lint-lua format mypy test e2e run chaos bench all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,flower,examples]'
	touch $(STAMP)

# celery-node for tests/test_node_producer.py, from the committed lock file: the test itself
# never downloads (it is skipped without node, and fails saying so without the package).
$(NODE_STAMP): tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/node --no-audit --no-fund; \
	else echo "npm not found: the celery-node test fails where node is installed"; fi

install: $(STAMP) $(NODE_STAMP)

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
test: lint mypy $(NODE_STAMP)
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
	$(BIN)/pytest tests/test_chaos.py -m chaos
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
