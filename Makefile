# The two commands a newcomer needs:
#   make demo   the main job: a tiny base -> SFT -> DPO + OnDARE pipeline on 2 CPU processes
#   make test   the test suite (slow multi-process tests included; `make test-fast` skips them)
# Both create .venv and install the project with pinned dependencies (constraints.txt) first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 2
PYTEST_ARGS ?=
# bash's `time` ends `make test` and `make test-fast` with their wall time (also when tests fail).
SHELL := /bin/bash
export TIMEFORMAT := wall time: %lR

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel -c constraints.txt
	$(PY) -m pip install -c constraints.txt -e ".[megatron,deepspeed,kernels,eval,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m onmerge_megatron.training.tiny_pipeline --out runs/tiny

test: $(STAMP)
	time $(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	time $(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/optimizer_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
