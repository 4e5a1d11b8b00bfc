# Two entry points for a fresh machine: `make serve` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Test processes run side by side (pytest-xdist); each test file stays in one of them, with its module fixtures.
TEST_WORKERS ?= 2

.PHONY: install serve test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-installs when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,dev,gpu]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/echo4o serve

lint: install
	$(BIN)/ruff check .

test: install
	bash scripts/ensure-test-deps.sh
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile
