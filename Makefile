# Two entry points for a fresh machine: `make serve` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Test processes run side by side (pytest-xdist); each test file stays in one of them, with its module fixtures.
TEST_WORKERS ?= 2
# Where the pinned torch comes from. Empty: pip's own index (PyPI on Linux: a CUDA build of several GB; the
# development machines' pip config: the CPU build). e.g. https://download.pytorch.org/whl/cpu or .../whl/cu128
TORCH_INDEX_URL ?=
TORCH_VERSION := $(shell sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)

.PHONY: install serve test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-installs when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(if $(TORCH_INDEX_URL),$(BIN)/python -m pip install -q 'torch==$(TORCH_VERSION)' --index-url $(TORCH_INDEX_URL))
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
