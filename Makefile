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

# Example 1 at two learning rates, logged to offline W&B runs, then plotted by `pf-lightning report`
# into demo_output/plots/ (0.5-2 minutes on 2 cores, as busy as the machine is). OMP_WAIT_POLICY=PASSIVE keeps torch's two
# OpenMP threads from spin-waiting on a busy machine, which slows the small matrix products 10-100x.
demo: $(STAMP)
	rm -rf demo_output
	OMP_WAIT_POLICY=PASSIVE WANDB_MODE=offline WANDB_SILENT=true $(PY) examples/edge_of_stability.py \
		--lrs 0.4 0.2 --steps 600 --logger wandb --out demo_output
	$(VENV)/bin/pf-lightning report demo_output

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	OMP_WAIT_POLICY=PASSIVE WANDB_MODE=offline $(PY) -m pytest

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
