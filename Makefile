# The two commands of the README: `make demo` (set up + main job) and `make test`.
# `make docs` builds the documentation site into site/ (strict), `make docs-serve` serves it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test docs docs-serve bench clean

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
	$(BIN)/python -m pytest -q --durations=15 tests  # the slowest tests, to keep the suite within its 25 minutes

# NO_MKDOCS_2_WARNING: Material's banner about its successor, not a warning about this site
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: setup
	$(BIN)/python tools/bench_data.py

clean:
	rm -rf runs/demo site
