# One command per job; every target works on a fresh clone.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
# torch/torchvision: lower bounds live in pyproject.toml; pip resolves the build the
# machine offers (here the 2.14.1 / 0.29.1 wheels on disk).
.DEFAULT_GOAL := help

.PHONY: help install test test-fast demo lint bench clean

help:
	@echo "make install    - create .venv and install attnscope (editable) with dev extras"
	@echo "make test       - run the whole test suite (installs first if needed)"
	@echo "make test-fast  - the suite without the tests marked slow (torchrun, end to end)"
	@echo "make demo       - run the main job on the bundled images (random weights if the Hub is unreachable)"
	@echo "make lint       - ruff check, ruff format --check, mypy"
	@echo "make bench      - benchmarks: capture overhead, probe bank, CLI start-up, token family, probe depth (print ratios)"

$(BIN)/attnscope: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@

install: $(BIN)/attnscope

test: $(BIN)/attnscope
	$(BIN)/python -m pytest tests

test-fast: $(BIN)/attnscope
	$(BIN)/python -m pytest tests -m "not slow"

lint: $(BIN)/attnscope
	$(BIN)/ruff check attnscope tests benchmarks examples
	$(BIN)/ruff format --check attnscope tests benchmarks examples
	$(BIN)/mypy

demo: $(BIN)/attnscope
	$(BIN)/python examples/demo.py

bench: $(BIN)/attnscope
	$(BIN)/python benchmarks/capture_overhead.py
	$(BIN)/python benchmarks/probe_bank.py
	$(BIN)/python benchmarks/cli_startup.py
	$(BIN)/python benchmarks/token_overhead.py
	$(BIN)/python benchmarks/probe_depth.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info demo-out
