# clearsight: `make demo` (set up + the main job on the builtin demo model), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# torch first, pinned: the CPU build on CPU machines (a plain `torch` requirement would pull CUDA wheels)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/clearsight demo --out runs/demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	cd benchmarks && ../$(BIN)/python plan_overhead.py
	cd benchmarks && ../$(BIN)/python mitigation_overhead.py
	cd benchmarks && ../$(BIN)/python branch_overhead.py
	cd benchmarks && ../$(BIN)/python attention_kernels.py
	cd benchmarks && ../$(BIN)/python engine_load.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
