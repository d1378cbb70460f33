# The two commands of the README: `make demo` (set up + main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

# torch==2.13.0 first: on these machines it is a local CPU build; unpinned, pip would pull CUDA.
$(BIN)/spactor: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/spactor

demo: setup
	$(BIN)/spactor train --config configs/demo-cpu.yaml

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python tools/bench_data.py

clean:
	rm -rf runs/demo
