# capgap: `make demo` and `make test` work on a fresh machine with Python 3.11.
# Both create .venv on first use and reuse it afterwards (the stamp file tracks setup.py).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.capgap-installed
TORCH  := torch==2.14.1 torchvision==0.29.1
# The Beam SDK the worker image is built from (docker/Dockerfile): a job's launcher and its
# workers must run the same Beam, so the dev venv installs that one, not pip's newest.
BEAM   := apache-beam==$(shell sed -n 's/^ARG BEAM_VERSION=//p' docker/Dockerfile)

.PHONY: demo test lint format bench sdist cluster-check clean gpu-wheels gpu-check-dry

$(STAMP): setup.py pyproject.toml docker/Dockerfile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]" "$(BEAM)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/capgap demo --config demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/lint_imports.py

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	for script in benchmarks/*.py; do case $$script in */gpu_check.py|*/wheel_closure.py) continue;; esac; $(BIN)/python $$script || exit 1; done

# A job service + an EXTERNAL worker pool whose venv has capgap only from the sdist.
cluster-check: $(STAMP)
	$(BIN)/python benchmarks/cluster_check.py

# Wheels the GPU machine lacks (Python 3.12, x86-64) into .whl/, for benchmarks/gpu_check.sh.
gpu-wheels: $(STAMP)
	bash benchmarks/gpu_wheels.sh .whl

# benchmarks/gpu_check.sh end to end on this CPU (micro model, small sizes; ~8 min on 2 cores).
gpu-check-dry: $(STAMP)
	bash benchmarks/gpu_check.sh --dry-run

sdist: $(STAMP)
	$(BIN)/python setup.py -q sdist

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
