# clearsight: `make demo` (set up + the main job on the builtin demo model), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
PYTEST_ARGS ?=
LATEST := .venv-latest

.PHONY: setup demo test test-latest lock bench lint mutation organism-card clean

setup: $(STAMP)

# Installs are locked: every version comes from $(LOCK) (`make lock` refreshes it). torch first: the lock pins
# the CPU build's version on CPU machines (a plain `torch` requirement would pull CUDA wheels).
# PIP_CONSTRAINT also reaches pip's isolated build environment (setuptools for the editable install).
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) --upgrade pip setuptools
	$(BIN)/python -m pip install --quiet -c $(LOCK) torch
	PIP_CONSTRAINT=$(abspath $(LOCK)) $(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[all,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/clearsight demo --out runs/demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Resolve the newest versions pyproject.toml allows and write them to $(LOCK).
lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh

# By hand, now and then: the tests on the newest versions pyproject.toml allows (a fresh $(LATEST) venv,
# no lock), with what differs from the lock printed first. Green here = `make lock` is safe to commit.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install --quiet torch==2.13.0
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[all,dev]"
	@$(LATEST)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
		| sort > $(LATEST)/freeze.txt
	@echo "newer than $(LOCK):"; grep '==' $(LOCK) | sort | comm -13 - $(LATEST)/freeze.txt | sed 's/^/  /'
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	cd benchmarks && ../$(BIN)/python plan_overhead.py
	cd benchmarks && ../$(BIN)/python mitigation_overhead.py
	cd benchmarks && ../$(BIN)/python branch_overhead.py
	cd benchmarks && ../$(BIN)/python compiled_step.py
	cd benchmarks && ../$(BIN)/python attention_kernels.py
	cd benchmarks && OMP_NUM_THREADS=1 ../$(BIN)/python engine_load.py  # 1 torch thread, as the README figures
	cd benchmarks && ../$(BIN)/python kv_join.py
	cd benchmarks && ../$(BIN)/python serve_load.py
	cd benchmarks && OMP_NUM_THREADS=1 ../$(BIN)/python eval_throughput.py

# The organism's model card and the README's organism tables: diagnostics on 400 held-out scenes + the demo job
# (every mitigation) on builtin:shapes-organism, written to its MODEL_CARD.md (docs/demo-model.md).
organism-card: setup
	$(BIN)/python -m clearsight.evals.organism --model builtin:shapes-organism --world organism --scenes 400 \
		--card clearsight/models/weights/shapes-organism/MODEL_CARD.md --demo runs/organism

lint: setup
	$(BIN)/ruff check .

# By hand (not CI: minutes per module): mutmut over the core modules, each with only its fast tests, at low
# priority. MODULES="sampling cache" picks some; scores and reviewed survivors are in docs/testing.md.
MODULES ?=
mutation: setup
	nice -n 10 $(BIN)/python scripts/mutation.py $(MODULES)

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache .ruff_cache build/mutation
