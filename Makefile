# Two commands on a fresh machine with Python 3.11+ and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench bench-quick chaos lint typecheck clean

$(BIN)/bgqueue: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/bgqueue
	$(BIN)/bgqueue demo

test: $(BIN)/bgqueue
	$(BIN)/ruff check bgqueue tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

# Figures against Celery, Dramatiq and RQ on one Redis started for the run (docs/performance.md).
$(BIN)/dramatiq: pyproject.toml $(BIN)/bgqueue
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(BIN)/dramatiq
	$(BIN)/python bench/run.py

bench-quick: $(BIN)/dramatiq
	$(BIN)/python bench/run.py --quick

# The fault scenarios too long for `make test`.
chaos: $(BIN)/bgqueue
	$(BIN)/pytest -q -m chaos tests/faults

lint: $(BIN)/bgqueue
	$(BIN)/ruff check bgqueue tests bench
	$(BIN)/ruff format --check bgqueue tests

typecheck: $(BIN)/bgqueue
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
