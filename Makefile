PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint format mypy test run chaos bench all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,flower]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	luacheck -q invoice_worker/lua

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

mypy: $(STAMP)
	$(BIN)/mypy

test: lint mypy
	$(BIN)/pytest

run: $(STAMP)
	$(BIN)/invoice-worker dev --demo 20

chaos: $(STAMP)
	$(BIN)/python -m chaos.run --jobs 5000

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

all: format test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
