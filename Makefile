# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (if missing) and install the project into it first.
#
# TORCH_SPEC pins the CPU build of torch that pip finds locally; GPU users override it, e.g.
#   make demo TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=
# extras installed with the project (CI adds the torchmil peers: EXTRAS=dev,peers)
EXTRAS ?= dev

BIN := $(VENV)/bin
STAMP := $(VENV)/.milcore-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/milcore run experiments/demo.yaml --set out=$(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check milcore feature_cache tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_synthetic.py --out benchmarks/results/latest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
