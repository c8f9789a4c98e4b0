# The two set-up commands from the README: `make demo` and `make test`.
# Each creates .venv if needed and installs the package with constraints.txt (torch==2.13.0, CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/signpost: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/signpost

demo: install
	$(BIN)/signpost run --config configs/demo.yaml

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf artifacts .pytest_cache
