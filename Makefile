# Every target sets up .venv itself: `make train` and `make test` work on a fresh clone.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The persistent compilation cache turns most of the suite's compile time into cache hits.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES ?= 0

.PHONY: install train test bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,dev]"
	touch $@

install: $(BIN)/.installed

train: $(BIN)/.installed
	$(BIN)/jmp train

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --doctest-modules tests jmp

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/comm.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/pipeline.py

lint: $(BIN)/.installed
	$(BIN)/ruff format --check jmp tests benchmarks conftest.py
	$(BIN)/ruff check jmp tests benchmarks conftest.py
	$(BIN)/pyright jmp

clean:
	rm -rf $(VENV) .cache runs
