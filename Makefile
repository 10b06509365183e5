# Two commands on a fresh machine with Python 3.11+ and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck clean

$(BIN)/bgqueue: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/bgqueue
	$(BIN)/bgqueue demo

test: $(BIN)/bgqueue
	$(BIN)/ruff check bgqueue tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(BIN)/bgqueue
	$(BIN)/ruff check bgqueue tests
	$(BIN)/ruff format --check bgqueue tests

typecheck: $(BIN)/bgqueue
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
