# Two commands set everything up from a fresh clone: `make demo` and `make test`.
# Both create .venv on first use. torch is pinned through constraints.txt so that pip takes the
# CPU build of torch 2.13.0 and never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench lint format clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(PY) examples/quickstart.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	WANDB_MODE=offline $(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/run.py all --out BENCHMARKS.md
	$(PY) benchmarks/overhead.py --out BENCHMARKS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
